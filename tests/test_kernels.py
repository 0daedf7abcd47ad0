"""CPU kernel choice by measurement: per shape, cached for the process and on disk, and both kernels agree."""

import json

import pytest
import torch

from onelayer.models import build_tiny
from onelayer.policy import kernels, lean_sequence_logprobs
from onelayer.policy.decoder import LeanDecoder
from onelayer.policy.ops import causal_allowed, position_ids

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="oneDNN not in this torch build")


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
        assert set(times) == {"default", "onednn"} and all(t > 0 for t in times.values())


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
    (a, ga, la), (b, gb, lb) = out["default"], out["onednn"]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(la, lb, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb))
