"""The compiled one-token decode step: the same logits, KV-cache entries and captured hidden states as the
Python step, chosen by measuring (and the choice reused), and a fallback when it cannot be built or differs."""

import pytest
import torch

from helpers import EOS, PAD, PROMPTS, build
from onelayer.policy import fused, kernels
from onelayer.policy.decoder import LeanDecoder
from onelayer.policy.ops import causal_allowed, position_ids
from onelayer.rollout import left_pad, sample


@pytest.fixture
def decided(monkeypatch):
    monkeypatch.setattr(fused, "_DECIDED", {})
    return fused._DECIDED


def _prefilled(model, G=2, capture=1):
    ids, pmask = left_pad(PROMPTS, PAD)
    N, P = ids.shape
    dec = LeanDecoder(model, N * G, P + 6, capture=capture)
    with torch.inference_mode():
        dec.forward(ids, position_ids(pmask), 0, causal_allowed(pmask))
        dec.repeat_rows(torch.arange(N).repeat_interleave(G))
    mask = torch.cat([pmask.bool(), torch.ones(N, 6, dtype=torch.bool)], 1).repeat_interleave(G, 0)[:, None, None, :]
    return dec, pmask.sum(1).repeat_interleave(G)[:, None], mask, P


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_compiled_step_matches_the_python_step(module, kind):
    """Three steps, the last on a subset of rows (finished rows dropped), with left padding and a capture."""
    model = build(kind).eval()
    dec, pos, mask, P = _prefilled(model)
    step = fused.FusedStep(dec, module)
    torch.manual_seed(0)
    rows = torch.arange(dec.k[0].shape[0])
    with torch.inference_mode():
        for t in range(3):
            if t == 2:  # keep every other row, as the sampler does once rows finish
                keep = torch.arange(0, len(rows), 2)
                dec.repeat_rows(keep)
                rows, pos, mask = rows[keep], pos[keep], mask[keep]
            B = len(rows)
            tok = torch.randint(3, 60, (B, 1))
            start, m = P + t, mask[..., : P + t + 1]
            want = dec._forward(tok, pos + t, start, m, rows)
            want_kv = fused._entries(dec, B, start, rows)
            got = step(tok, pos + t, start, m, rows)
            assert got.shape == want.shape
            assert fused._close(got, want) < 1e-5
            for a, b in zip(fused._entries(dec, B, start, rows), want_kv):
                assert fused._close(a, b) < 1e-5


def test_sampling_with_the_compiled_step_gives_the_same_rollout(module, decided, monkeypatch):
    model = build("qwen3")
    runs = {}
    for setting in ("off", "on"):
        monkeypatch.setenv(fused.ENV, setting)
        runs[setting] = sample(model, PROMPTS, num_generations=3, max_new_tokens=12, temperature=0.9, eos_id=EOS,
                               pad_id=PAD, generator=torch.Generator().manual_seed(0), capture_block=2)
    off, on = runs["off"], runs["on"]
    assert torch.equal(off.completion_ids, on.completion_ids) and torch.equal(off.completion_mask, on.completion_mask)
    assert (off.logprobs - on.logprobs).abs().max() < 1e-5
    assert (off.block_input - on.block_input).abs().max() < 1e-5
    assert any(v["choice"] == "fused" for k, v in fused.choices().items() if k.startswith("decode:"))


def test_the_choice_is_measured_once_stored_and_reused(module, decided, monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(fused.ENV, "auto")
    timed = []

    def fake_time(fn, reps=5):  # the compiled step measures slower here: the Python step must be kept
        timed.append(fn)
        return 1.0 if len(timed) % 2 == 1 else 2.0

    monkeypatch.setattr(fused, "_time", fake_time)
    model = build("qwen3")
    kw = dict(num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    sample(model, PROMPTS, **kw)  # the lean path's own check of the model decodes too: one shape per batch band
    records = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert records and len(timed) == 2 * len(records)
    for key, record in records.items():
        assert record["choice"] == "python" and record["reason"] == "measured"
        assert kernels.stored(key)["choice"] == "python"
    decided.clear()  # a new process on this machine: the stored timings, no new measurement
    sample(model, PROMPTS, **kw)
    again = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert again and len(timed) == 2 * len(records)
    assert all(v["reason"] == "measured earlier on this machine" and v["choice"] == "python" for v in again.values())


def test_a_compiled_step_that_differs_is_not_used(module, decided, monkeypatch):
    monkeypatch.setenv(fused.ENV, "on")
    real = fused.FusedStep.__call__
    monkeypatch.setattr(fused.FusedStep, "__call__", lambda self, *a: real(self, *a) + 1e-2)
    model = build("llama")
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    record = next(v for k, v in fused.choices().items() if k.startswith("decode:"))
    assert record["choice"] == "python" and "differed" in record["reason"]
    monkeypatch.setenv(fused.ENV, "off")
    again = sample(model, PROMPTS, num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.completion_ids, again.completion_ids) and torch.equal(batch.logprobs, again.logprobs)


def test_without_a_build_the_python_step_serves(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_EXT", {})
    monkeypatch.setattr(fused, "SOURCES", (tmp_path / "missing.cpp",))
    assert fused.extension() is None and fused.build_note().startswith("not built (FileNotFoundError")
    model = build("qwen3")
    dec = LeanDecoder(model, 2, 8)
    assert dec.fused is None
    monkeypatch.setenv(fused.ENV, "off")
    monkeypatch.setattr(fused, "_EXT", {"module": object()})
    assert LeanDecoder(model, 2, 8).fused is None  # turned off: never built or used
