"""CPU kernel choice by measurement: per shape, cached for the process and on disk, and every kernel agrees."""

import json

import pytest
import torch
import torch.nn.functional as F

from onelayer.models import build_tiny
from onelayer.policy import kernels, lean_sequence_logprobs
from onelayer.policy.decoder import LeanDecoder
from onelayer.policy.ops import causal_allowed, position_ids

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="oneDNN not in this torch build")


@pytest.fixture
def split_kernel():
    """The split kernel runs here: two or more threads (set for the test; an earlier test may have left one)
    and the compiled module."""
    from onelayer.policy import fused

    if fused.extension() is None:
        pytest.skip(f"the compiled module is unavailable here: {fused.build_note()}")
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_TIMES", {})
    return tmp_path


@needs_onednn
def test_choice_is_measured_once_per_shape_kept_and_reused_by_a_later_process(fresh, monkeypatch):
    calls = []

    def fake(m, k, n, transposed=False):  # oneDNN faster on wide shapes, slower on narrow ones, a near-tie on one
        calls.append((m, k, n))
        return {"default": 1.0, "onednn": {512: 0.5, 64: 2.0, 128: 0.97}[n]}

    monkeypatch.setattr(kernels, "measure", fake)
    assert kernels.choose(60, 32, 512) == "onednn"
    assert kernels.choose(64, 32, 512) == "onednn"  # same row band (64): not measured again
    assert kernels.choose(60, 32, 64) == "default"
    assert kernels.choose(60, 32, 128) == "default"  # 3 % faster is inside the margin: the default stays
    assert calls == [(64, 32, 512), (64, 32, 64), (64, 32, 128)]
    stored = json.loads(kernels._store_path().read_text())
    assert stored["64x32x512"]["choice"] == "onednn" and stored["_machine"]["threads"] == torch.get_num_threads()
    # a new process on this machine reuses the stored choices instead of timing again
    monkeypatch.setattr(kernels, "_CHOICES", {})
    assert kernels.choose(33, 32, 512) == "onednn" and len(calls) == 3
    assert set(kernels.choices()) == {"64x32x512"}
    monkeypatch.setenv(kernels.ENV, "default")
    assert kernels.choose(64, 32, 512) == "default" and "forced" in kernels.summary()


def test_weight_gradient_shapes_are_bucketed_by_their_token_dimension(fresh, monkeypatch):
    """dW = dY^T X has the batch's tokens as its inner dimension, a new size nearly every step: it must share
    one measurement per band, not time (and store) each size."""
    calls = []
    monkeypatch.setattr(kernels, "measure", lambda m, k, n, transposed=False: calls.append((m, k, n, transposed))
                        or {"default": 1.0, "onednn": 0.5})
    for tokens in (1000, 1013, 1024, 777):
        kernels.choose(128, tokens, 512, tokens="k")
    assert calls == [(128, 1024, 512, True)]  # timed on transposed views, as a weight gradient is called
    kernels.choose(128, 1025, 512, tokens="k")
    assert calls[-1] == (128, 2048, 512, True) and set(kernels.choices()) == {"128x1024x512xt", "128x2048x512xt"}


@needs_onednn
def test_real_measurement_returns_positive_times(fresh):
    for transposed in (False, True):
        times = kernels.measure(16, 64, 128, transposed=transposed)
        assert {"default", "onednn"} <= set(times) and all(t > 0 for t in times.values())
        assert ("split" in times) == (not transposed and "split" in kernels.available())


@needs_onednn
@pytest.mark.parametrize("fold", [True, False])
def test_both_kernels_give_the_same_logprobs_and_logits(monkeypatch, fold):
    model, tok = build_tiny("tiny-qwen3", seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, :3] = 0
    out = {}
    for kernel in kernels.KERNELS:
        monkeypatch.setenv(kernels.ENV, kernel)
        logp = lean_sequence_logprobs(model, ids, mask, 6, torch.tensor([0, 0, 1, 1]))
        grads = torch.autograd.grad(logp.sum(), [p for p in model.parameters()][:40:7])
        with torch.no_grad():
            dec = LeanDecoder(model, 4, 10, fold=fold)
            logits = dec.forward(ids, position_ids(mask), 0, causal_allowed(mask))
        out[kernel] = (logp.detach(), grads, logits)
    a, ga, la = out["default"]
    for kernel in kernels.KERNELS[1:]:
        b, gb, lb = out[kernel]
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(la, lb, atol=1e-5), kernel
        assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb)), kernel


def test_the_fastest_kernel_wins_only_by_the_margin(fresh, monkeypatch):
    times = {64: {"default": 1.0, "onednn": 0.8, "split": 0.6}, 128: {"default": 1.0, "onednn": 1.2, "split": 0.97},
             256: {"default": 1.0, "onednn": 0.9, "split": 1.3}}
    monkeypatch.setattr(kernels, "available", lambda: kernels.KERNELS)
    monkeypatch.setattr(kernels, "measure", lambda m, k, n, transposed=False: times[n])
    assert [kernels.choose(64, 32, n) for n in (64, 128, 256)] == ["split", "default", "onednn"]
    assert "1 split" in kernels.summary() and "1 onednn" in kernels.summary()


def test_split_kernel_matches_the_default_with_bias_and_residual(split_kernel):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 7, 64, generator=g), torch.randn(100, 64, generator=g), torch.randn(100, generator=g)
    add = torch.randn(5, 7, 100, generator=g)
    torch.testing.assert_close(kernels.split_linear(x, w, None), F.linear(x, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.split_linear(x, w, b), F.linear(x, w, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.split_linear(x, w, b, add), add + F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    # inside autograd's forward (grad off) and under inference mode alike; gradients flow through ops.linear
    with torch.inference_mode():
        assert kernels.split_linear(x, w, b).shape == (5, 7, 100)
    from onelayer.policy.ops import _ChosenLinear

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    _ChosenLinear.apply(xr, wr, b, "split").square().sum().backward()
    xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xd, wd, b).square().sum().backward()
    torch.testing.assert_close(xr.grad, xd.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(wr.grad, wd.grad, rtol=1e-5, atol=1e-4)


def test_a_choice_holds_for_the_thread_count_it_was_measured_at(fresh, monkeypatch):
    """The split kernel runs only on 2+ threads: a choice made at 2 must not serve a run at 1 (`--threads 1`)."""
    before = torch.get_num_threads()
    monkeypatch.setattr(kernels, "available", lambda: ("default", "split") if torch.get_num_threads() > 1 else ("default",))
    monkeypatch.setattr(kernels, "measure", lambda m, k, n, transposed=False: {"default": 1.0, "split": 0.5})
    try:
        torch.set_num_threads(2)
        assert kernels.choose(64, 32, 512) == "split"
        torch.set_num_threads(1)
        assert kernels.choose(64, 32, 512) == "default" and kernels.choices() == {}
    finally:
        torch.set_num_threads(before)


def test_time_each_interleaves_its_rounds_and_keeps_each_ones_best():
    """Each callable runs once untimed, then once per round in a rotating order; the result is its fastest round."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = kernels.time_each(fns, 3)
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
