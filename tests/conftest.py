"""Shared fixtures: an isolated warm-start cache per test session, so tests never touch ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def onelayer_cache(tmp_path_factory):
    if "ONELAYER_CACHE" not in os.environ:
        os.environ["ONELAYER_CACHE"] = str(tmp_path_factory.mktemp("onelayer-cache"))
    return os.environ["ONELAYER_CACHE"]
