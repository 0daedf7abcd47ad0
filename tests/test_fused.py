"""The compiled one-token decode step: the same logits, KV-cache entries and captured hidden states as the
Python step, chosen by measuring (and the choice reused), and a fallback when it cannot be built or differs."""

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("variant", ["fused", "packed"])
@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_compiled_step_matches_the_python_step(module, kind, variant):
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
            got = step(tok, pos + t, start, m, rows, variant=variant)
            assert got.shape == want.shape
            assert fused._close(got, want) < 1e-5
            for a, b in zip(fused._entries(dec, B, start, rows), want_kv):
                assert fused._close(a, b) < 1e-5


def test_only_the_packing_every_rollout_repeats_is_counted_against_packed(module):
    """A frozen block's packing is kept for later rollouts, so only trainable blocks' packing is a per-rollout
    cost (`pack_s`, spread over the steps when packed is timed), and the choice is kept per count of them."""
    model = build("qwen3")
    model.requires_grad_(False)
    frozen = fused.FusedStep(LeanDecoder(model, 2, 8), module)
    frozen.packed()
    assert sum(frozen.dec.fresh) == 0 and frozen.pack_s == 0.0 and frozen.shape.endswith("-fresh0")
    model.model.layers[1].requires_grad_(True)
    one = fused.FusedStep(LeanDecoder(model, 2, 8), module)
    one.packed()
    assert one.dec.fresh == [i == 1 for i in range(len(model.model.layers))]
    assert one.pack_s > 0.0 and one.shape.endswith("-fresh1")


def test_packed_linear_is_the_linear_and_the_same_on_any_thread_count(module):
    """Rows and columns that are not whole tiles, a bias and an added residual; each output element is one sum
    over k in order, so 1 and 2 threads agree bit for bit."""
    width = module.packed_width()
    torch.manual_seed(0)
    for m, k, n in ((1, 16, 8), (7, 33, width + 5), (64, 128, 3 * width), (13, 64, 2 * width - 1)):
        x, w, b, add = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
        packed = module.pack_weight(w)
        assert packed.shape == ((n + width - 1) // width, k, width)
        got = module.packed_linear(x, packed, n, torch.empty(0), torch.empty(0))
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
        with_both = module.packed_linear(x, packed, n, b, add)
        torch.testing.assert_close(with_both, add + F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = module.packed_linear(x, packed, n, b, add)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, with_both)
    with pytest.raises(RuntimeError, match="not packed for this input"):
        module.packed_linear(torch.randn(2, 8), module.pack_weight(torch.randn(4, 16)), 4, torch.empty(0), torch.empty(0))
    shifted = torch.empty(2 * 16 * width + 1)[1:].view(2, 16, width)  # a view one float off the allocation
    with pytest.raises(RuntimeError, match="aligned"):
        module.packed_linear(torch.randn(2, 16), shifted, width + 1, torch.empty(0), torch.empty(0))


@pytest.mark.parametrize("compiled", ["on", "packed"])
def test_sampling_with_the_compiled_step_gives_the_same_rollout(module, decided, monkeypatch, compiled):
    model = build("qwen3")
    runs = {}
    for setting in ("off", compiled):
        monkeypatch.setenv(fused.ENV, setting)
        runs[setting] = sample(model, PROMPTS, num_generations=3, max_new_tokens=12, temperature=0.9, eos_id=EOS,
                               pad_id=PAD, generator=torch.Generator().manual_seed(0), capture_block=2)
    off, on = runs["off"], runs[compiled]
    assert torch.equal(off.completion_ids, on.completion_ids) and torch.equal(off.completion_mask, on.completion_mask)
    assert (off.logprobs - on.logprobs).abs().max() < 1e-5
    assert (off.block_input - on.block_input).abs().max() < 1e-5
    variant = {"on": "fused", "packed": "packed"}[compiled]
    assert any(v["choice"] == variant for k, v in fused.choices().items() if k.startswith("decode:"))


def test_the_choice_is_measured_once_stored_and_reused(module, decided, monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(fused.ENV, "auto")
    timed = []

    real = kernels.time_each

    def fake_time(fns, reps):  # both compiled variants measure slower here: the Python step must be kept
        if "python" not in fns:  # matmul kernels: timed for real
            return real(fns, reps)
        timed.extend(fns)
        return {name: 1.0 if name == "python" else 2.0 for name in fns}

    monkeypatch.setattr(kernels, "time_each", fake_time)
    model = build("qwen3")
    kw = dict(num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    sample(model, PROMPTS, **kw)  # the lean path's own check of the model decodes too: one shape per batch band
    records = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert records and len(timed) == 3 * len(records)  # python, fused, packed
    for key, record in records.items():
        assert record["choice"] == "python" and record["reason"] == "measured"
        assert kernels.stored(key)["choice"] == "python"
    decided.clear()  # a new process on this machine: the stored timings, no new measurement
    sample(model, PROMPTS, **kw)
    again = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert again and len(timed) == 3 * len(records)
    assert all(v["reason"] == "measured earlier on this machine" and v["choice"] == "python" for v in again.values())


def test_the_packed_variant_serves_where_it_measures_faster(module, decided, monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(fused.ENV, "auto")
    seconds, real = {"python": 3.0, "fused": 2.0, "packed": 1.0}, kernels.time_each
    monkeypatch.setattr(kernels, "time_each", lambda fns, reps: {name: (fn(), seconds[name])[1] for name, fn in fns.items()}
                        if "python" in fns else real(fns, reps))
    model = build("qwen3")
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    records = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert records and all(v["choice"] == "packed" and v["packed"] >= 1.0 for v in records.values())
    monkeypatch.setenv(fused.ENV, "off")
    again = sample(model, PROMPTS, num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.completion_ids, again.completion_ids)
    assert (batch.logprobs - again.logprobs).abs().max() < 1e-5


def test_pick_needs_a_margin_at_each_stage():
    assert fused.pick({"python": 3.0, "fused": 2.0, "packed": 1.0}) == "packed"
    assert fused.pick({"python": 3.0, "fused": 2.0, "packed": 1.95}) == "fused"  # within the margin: fused
    assert fused.pick({"python": 1.0, "fused": 0.97, "packed": 0.96}) == "python"
    assert fused.pick({"python": 1.0, "packed": 0.5}) == "packed"  # fused failed its check
    assert fused.pick({"python": 1.0}) == "python"


def test_a_compiled_step_that_differs_is_not_used(module, decided, monkeypatch):
    monkeypatch.setenv(fused.ENV, "on")
    real = fused.FusedStep.__call__
    monkeypatch.setattr(fused.FusedStep, "__call__", lambda self, *a, **kw: real(self, *a, **kw) + 1e-2)
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


def test_a_forced_kernel_leaves_the_packed_gemm_out(module, decided, monkeypatch, tmp_path):
    """ONELAYER_CPU_LINEAR pins every matmul (the golden runs use it), so the packed GEMM is not a candidate,
    and what is decided then is stored apart from the free choice."""
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(kernels.ENV, "default")
    monkeypatch.setenv(fused.ENV, "packed")
    sample(build("qwen3"), PROMPTS, num_generations=2, max_new_tokens=4, eos_id=-1, pad_id=PAD,
           generator=torch.Generator().manual_seed(0))
    records = {k: v for k, v in fused.choices().items() if k.startswith("decode:")}
    assert records and all(k.endswith("-default") and v["choice"] == "fused" for k, v in records.items())
