"""Shared fixtures: an isolated warm-start cache per test session, so tests never touch ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def onelayer_cache(tmp_path_factory):
    if "ONELAYER_CACHE" not in os.environ:
        os.environ["ONELAYER_CACHE"] = str(tmp_path_factory.mktemp("onelayer-cache"))
    return os.environ["ONELAYER_CACHE"]


@pytest.fixture(scope="session")
def base_dir(onelayer_cache):
    """The warm-started tiny model for arith (built once per session, ~1 min on 2 cores)."""
    from onelayer import tasks
    from onelayer.train.warmstart import warm_started

    return warm_started("tiny-qwen3", tasks.make("arith", n_eval=200), max_new_tokens=8)


@pytest.fixture
def module():
    """The compiled module (`policy.fused`: the decode step and the training kernels); skips where it cannot be built."""
    from onelayer.policy import fused

    mod = fused.extension()
    if mod is None:
        pytest.skip(f"the compiled module is unavailable here: {fused.build_note()}")
    return mod
