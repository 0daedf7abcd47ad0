"""The training forward's compiled kernels: the same log-probs and gradients as the torch ops, the same bits on
any thread count, chosen by measuring (and the choice reused), refused when they differ, off when asked."""

import pytest
import torch

from helpers import assert_grads_close, build, rollout
from onelayer.policy import fused, fused_ops, kernels, lean_sequence_logprobs


@pytest.fixture
def decided(monkeypatch):
    monkeypatch.setattr(fused_ops, "_DECIDED", {})
    return fused_ops._DECIDED


def _run(model, batch, ops, **kw):
    model.zero_grad(set_to_none=True)
    lp = lean_sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, batch.prompt_index,
                                temperature=0.9, ops=ops, **kw)
    (lp * batch.completion_mask * torch.linspace(-1, 1, lp.shape[1])).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("start", [None, 2])
def test_compiled_ops_give_the_torch_ops_logprobs_and_gradients(module, kind, start):
    """Left-padded shared prompts, completions of different lengths; from the embeddings, or from block 2 on
    captured hidden states (frozen-prefix reuse)."""
    model = build(kind)
    batch = rollout(model, capture=start)
    kw = {} if start is None else {"block_input": batch.block_input, "block_index": start}
    if start is not None:
        for i, block in enumerate(model.model.layers):
            block.requires_grad_(i >= start)
        model.model.embed_tokens.requires_grad_(False)
    want, want_g = _run(model, batch, fused_ops.TorchOps, **kw)
    got, got_g = _run(model, batch, fused_ops.CompiledOps, **kw)
    assert ((got - want).abs() * batch.completion_mask).max() < 1e-5
    assert_grads_close(want_g, got_g, rel=1e-4)
    if start is not None:
        assert not any(n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for n in got_g)


def test_the_kernels_give_the_same_bits_on_one_and_two_threads(module):
    """Rows are split over threads and weight gradients summed in fixed chunks: the thread count cannot change a bit."""
    g = torch.Generator().manual_seed(0)
    R, H, h, kvh, d = 300, 64, 4, 2, 16
    x, w, dy = torch.randn(R, H, generator=g), torch.randn(H, generator=g), torch.randn(R, H, generator=g)
    qkv = torch.randn(R, (h + 2 * kvh) * d, generator=g)
    wq, wk, cos, sin = (torch.randn(*s, generator=g) for s in ((d,), (d,), (R, d), (R, d)))
    dq, dk, dv = torch.randn(R, h, d, generator=g), torch.randn(R, kvh, d, generator=g), torch.randn(R, kvh, d, generator=g)
    gu, dh = torch.randn(R, 2 * H, generator=g), torch.randn(R, H, generator=g)

    def everything():
        y, rstd = module.rms_fwd(x, w, 1e-6)
        q, k, v, r = module.qkv_fwd(qkv, wq, wk, cos, sin, 1e-6, h, kvh, d)
        out = module.swiglu_fwd(gu)
        return [y, rstd, *module.rms_bwd(dy, x, w, rstd, True), q, k, v, r,
                *module.qkv_bwd(dq, dk, dv, qkv, wq, wk, cos, sin, r, h, kvh, d), out, module.swiglu_bwd(dh, gu)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = everything()
        torch.set_num_threads(2)
        two = everything()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("N,P,G,Tc,h,kvh,d", [
    (16, 6, 4, 23, 4, 2, 64),  # the bench's tiny-qwen3-large shapes: whole vector blocks of keys and a tail
    (3, 5, 2, 4, 4, 2, 16),
    (1, 4, 5, 7, 6, 3, 12),  # d not a whole number of vectors: the plain loops
    (2, 1, 3, 1, 2, 2, 8),  # one prompt token, one completion position
])
def test_attention_on_the_shared_prompt_layout_is_sdpas(module, N, P, G, Tc, h, kvh, d):
    """The compiled attention against the torch ops (two SDPA calls over sliced, index-selected keys): left
    padding, a prompt of padding only, rows in shuffled order, grouped kv heads; outputs and q/k/v gradients
    agree to float rounding, and its gradients are the same bits on 1 and 2 threads."""
    g = torch.Generator().manual_seed(N * 100 + P)
    B, R = N * G, N * P + N * G * Tc
    inv = torch.arange(N).repeat_interleave(G)[torch.randperm(B, generator=g)]
    pmask = torch.ones(N, P, dtype=torch.bool)
    pmask[0, : P // 2] = False
    if N > 1:
        pmask[-1] = False
    layout = fused_ops.SharedPrompts(pmask, inv, Tc)
    q, k, v = (torch.randn(R, n, d, generator=g, requires_grad=True) for n in (h, kvh, kvh))
    weight = torch.randn(R, h * d, generator=g)

    def run(ops):
        out = ops.attention(q, k, v, layout)
        return [out.detach(), *torch.autograd.grad((out * weight).sum(), (q, k, v))]

    want = run(fused_ops.TorchOps)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(fused_ops.CompiledOps)
        torch.set_num_threads(2)
        two = run(fused_ops.CompiledOps)
    finally:
        torch.set_num_threads(threads)
    for got, ref in zip(two, want):
        assert fused._close(got, ref) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_attention_refuses_a_layout_that_does_not_fit(module):
    q, k = torch.randn(10, 2, 8), torch.randn(10, 1, 8)
    with pytest.raises(RuntimeError, match="tokens are not N P"):
        module.attn_fwd(q, k, k, torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1]), 3, 1.0)
    with pytest.raises(RuntimeError, match="inv out of range"):
        module.attn_fwd(q, k, k, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 2]), 3, 1.0)


def test_the_choice_is_checked_measured_once_stored_and_reused(module, decided, monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(fused_ops.ENV, "auto")
    timed = []

    real = kernels.time_each

    def fake_time(fns, reps):  # the compiled ops measure faster here (matmul kernels are timed for real)
        if "compiled" not in fns:
            return real(fns, reps)
        timed.extend(fns)
        return {"torch": 2.0, "compiled": 1.0}

    monkeypatch.setattr(kernels, "time_each", fake_time)
    model = build("qwen3")
    batch = rollout(model)
    want, _ = _run(model, batch, fused_ops.TorchOps)
    got, _ = _run(model, batch, None)  # decided here: checked, timed, stored
    assert ((got - want).abs() * batch.completion_mask).max() < 1e-5
    records = {k: v for k, v in fused_ops.choices().items() if k.startswith("train:")}
    assert len(records) == 1 and len(timed) == 2
    (key, record), = records.items()
    assert record["timed"] == "forward and backward" and record["choice"] == "compiled" and record["reason"] == "measured"
    assert kernels.stored(key)["choice"] == "compiled"
    decided.clear()  # a new process on this machine: checked again, the stored timing reused
    _run(model, batch, None)
    assert len(timed) == 2 and fused_ops.choices()[key]["reason"] == "measured earlier on this machine"
    # without gradients (a KL reference) and on fewer tokens (a minibatch): the same decision, so the reference's
    # log-probs and the policy's come from the same ops
    with torch.no_grad():
        ref = lean_sequence_logprobs(model, batch.input_ids[:4], batch.attention_mask[:4], batch.prompt_len,
                                     batch.prompt_index[:4])
        again = lean_sequence_logprobs(model, batch.input_ids[:4], batch.attention_mask[:4], batch.prompt_len,
                                       batch.prompt_index[:4], ops=fused_ops.CompiledOps)
    assert len(timed) == 2 and [k for k in fused_ops.choices() if k.startswith("train:")] == [key]
    assert torch.equal(ref, again)


def test_compiled_ops_that_differ_are_not_used(module, decided, monkeypatch):
    monkeypatch.setenv(fused_ops.ENV, "on")
    real = fused_ops.CompiledOps.norm
    monkeypatch.setattr(fused_ops.CompiledOps, "norm", staticmethod(lambda x, norm: real(x, norm) * 1.01))
    model = build("llama")
    batch = rollout(model)
    _run(model, batch, None)
    record = next(v for k, v in fused_ops.choices().items() if k.startswith("train:"))
    assert record["choice"] == "torch" and "differed" in record["reason"]


def test_off_or_a_forward_they_do_not_cover_takes_the_torch_ops(module, decided, monkeypatch):
    model = build("qwen3")
    x = torch.zeros(4, model.config.hidden_size)
    monkeypatch.setenv(fused_ops.ENV, "off")
    assert fused_ops.choose(model, None, x, 0) is fused_ops.TorchOps
    monkeypatch.setenv(fused_ops.ENV, "on")
    assert fused_ops._why_not(model.double(), x.double()) == "not a float32 CPU forward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_ops._why_not(model.float(), x) == "not a float32 CPU forward"
    monkeypatch.setattr(fused, "_EXT", {"reason": "not built (no compiler)"})
    assert fused_ops._why_not(model, x) == "compiled module not built (no compiler)"
    assert not decided
