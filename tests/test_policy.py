"""The lean Llama-family paths (onelayer.policy): the lean decoder used for rollouts, the lean training
forward and the support check must reproduce the model's own forward, or decline the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from helpers import V, assert_close, assert_grads_close, build, logprobs_and_grads, rollout
from onelayer.models.layers import select_layers
from onelayer.policy import lean_available, lean_support, sequence_logprobs


def test_probe_catches_a_wrong_decode_step(monkeypatch):
    from onelayer.policy.decoder import LeanDecoder

    real = LeanDecoder.forward

    def off_in_decode(self, ids, *a, **kw):  # prefill right, every decode step slightly wrong
        out = real(self, ids, *a, **kw)
        return out + 1e-2 if ids.shape[1] == 1 else out

    monkeypatch.setattr(LeanDecoder, "forward", off_in_decode)
    assert not lean_available(build("qwen3"))



@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_lean_path_is_used_and_matches_the_models_forward(kind):
    model = build(kind)
    assert lean_support(model) is None and lean_available(model)
    lean, hf = rollout(model, lean=True), rollout(model, lean=False)
    assert torch.equal(lean.input_ids, hf.input_ids)  # same generator, same distribution: same samples
    with torch.no_grad():
        full = sequence_logprobs(model, hf.input_ids, hf.attention_mask, hf.prompt_len, temperature=0.9, lean=False)
    assert_close(lean.logprobs, full, lean.completion_mask)
    assert_close(hf.logprobs, full, hf.completion_mask)



@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
@pytest.mark.parametrize("spec", ["all", "2"])
def test_lean_training_forward_matches_hf_logprobs_and_gradients(kind, spec):
    # rows of one prompt share their prompt's computation in the lean path; autograd must sum it back
    model = build(kind)
    select_layers(model, spec, train_non_block=spec == "all")
    batch = rollout(model)
    model.train()
    lp_hf, g_hf = logprobs_and_grads(model, batch, lean=False)
    lp_lean, g_lean = logprobs_and_grads(model, batch, prompt_index=batch.prompt_index)
    assert_close(lp_hf, lp_lean, batch.completion_mask)
    assert_grads_close(g_hf, g_lean)



def test_lean_training_gradients_are_bitwise_reproducible_on_two_threads():
    """Shared prompts fan out to their rows; with shuffled rows that fan-out's backward once summed the rows'
    gradients in a thread-dependent order, so runs of one seed drifted apart (full-RL gain 40-46 % over 300 steps)."""
    from onelayer.models import build_tiny
    from onelayer.policy import lean_sequence_logprobs

    model, _ = build_tiny("tiny-qwen3", seed=0)
    g = torch.Generator().manual_seed(0)
    N, G, P, T = 16, 4, 24, 24
    ids = torch.cat([torch.randint(5, 60, (N, P), generator=g).repeat_interleave(G, 0),
                     torch.randint(5, 60, (N * G, T), generator=g)], 1)
    perm = torch.randperm(N * G, generator=g)  # the update's minibatch order
    rows, mask, prompt_index = ids[perm], torch.ones_like(ids), torch.arange(N).repeat_interleave(G)[perm]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def grads():
            logp = lean_sequence_logprobs(model, rows, mask, P, prompt_index)
            return torch.autograd.grad(logp.sum(), list(model.parameters()))

        ref = grads()
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(ref, grads()))
    finally:
        torch.set_num_threads(threads)



def test_lean_path_declines_models_it_would_not_reproduce():
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V))
    assert "model type" in lean_support(gpt2) and not lean_available(gpt2)
    # an adapter-like module in place of a projection, or a hook that changes what a block computes
    model = build("qwen3")
    model.model.layers[1].mlp.up_proj = nn.Sequential(model.model.layers[1].mlp.up_proj)
    assert "nn.Linear" in lean_support(model)
    model = build("qwen3")
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: (o[0] * 2, *o[1:]))
    assert lean_support(model) is not None
    batch = rollout(model)  # falls back to the model's own forward, so the hook is honoured
    with torch.no_grad():
        full = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=0.9,
                                 lean=False)
    assert_close(batch.logprobs, full, batch.completion_mask)
    handle.remove()



@pytest.mark.parametrize("fold", [True, False], ids=["cpu-layout", "gpu-layout"])
@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_lean_decoder_layouts_match_the_models_forward(kind, fold):
    """Both weight layouts of the lean decoder (gathered and folded on CPU; the model's own tensors on GPU)
    give the model's logits for a left-padded prefill and the decode steps after it."""
    from onelayer.policy.decoder import LeanDecoder

    model = build(kind).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    nxt = torch.tensor([[13, 14], [15, 16]])
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
        dec = LeanDecoder(model, 2, 7, fold=fold)
        q, k = torch.arange(5)[:, None], torch.arange(5)[None, :]
        prefill_mask = ((k <= q) & mask.bool()[:, None, None, :]) | (k == q)
        got = [dec.forward(ids, pos[:, :5], 0, prefill_mask)]
        for t in range(2):
            step_mask = full_mask.bool()[:, None, None, : 6 + t]
            got.append(dec.forward(nxt[:, t : t + 1], pos[:, 5 + t : 6 + t], 5 + t, step_mask))
    for i, logits in enumerate(got):
        assert (logits - ref[:, 4 + i]).abs().max() < 1e-4



def test_lean_decoder_keeps_frozen_weights_between_rollouts_and_notices_any_change(monkeypatch):
    """A frozen block's gathered weights are reused by the next decoder; a trainable block's are not; a frozen
    weight changed in place, even without a version bump (`.data`, fused AdamW), is gathered again."""
    from onelayer.policy.decoder import LeanDecoder

    model = build("qwen3").eval()
    select_layers(model, "1")  # block 1 trains, the rest is frozen
    blocks = model.model.layers
    first, second = LeanDecoder(model, 2, 8), LeanDecoder(model, 2, 8)
    assert first.layers[0] is second.layers[0] and first.head is second.head
    assert first.layers[1] is not second.layers[1]
    before = second.layers[0]["gate_up"]["w"][0].clone()  # a copy: gate and up concatenated, the norm folded in
    with torch.no_grad():
        blocks[0].mlp.up_proj.weight.data.add_(0.5)  # no version bump
    third = LeanDecoder(model, 2, 8)
    assert third.layers[0] is not second.layers[0]
    assert not torch.equal(third.layers[0]["gate_up"]["w"][0], before)
    assert third.layers[2] is second.layers[2]
    # a block trained with fused AdamW (no version bump either) and frozen again is gathered afresh
    w = blocks[2].self_attn.q_proj.weight
    before = third.layers[2]["qkv"]["w"][0].clone()
    w.requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=1e-2, fused=True)
    w.grad = torch.ones_like(w)
    opt.step()
    w.requires_grad_(False)
    fourth = LeanDecoder(model, 2, 8)
    assert fourth.layers[2] is not third.layers[2] and not torch.equal(fourth.layers[2]["qkv"]["w"][0], before)
    import onelayer.policy.decoder as decoder

    monkeypatch.setattr(decoder, "KEEP_MODEL_BYTES", 0)  # a larger model: nothing kept
    assert LeanDecoder(model, 2, 8).layers[0] is not LeanDecoder(model, 2, 8).layers[0]
