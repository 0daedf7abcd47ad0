"""Mixed precision keeps every update: fp32 trainable tensors and AdamW state, bf16 frozen tensors, autocast."""

import pytest
import torch

from onelayer.algos import policy_loss
from onelayer.models import build_tiny
from onelayer.models.layers import fingerprint_frozen, frozen_unchanged, select_layers, trainable_parameters
from onelayer.policy import sequence_logprobs
from onelayer.rollout import sample
from onelayer.train.precision import Precision

LR, STEPS = 1e-6, 20


def _fixed_batch():
    """One rollout batch and advantages, sampled once from the float32 model, reused for every mode."""
    torch.manual_seed(0)
    model, tok = build_tiny("tiny-qwen3", seed=0)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ("12+34=", "56+7=", "8+90=", "21+43=")]
    batch = sample(model, prompts, num_generations=4, max_new_tokens=6, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(batch.input_ids.shape[0], generator=torch.Generator().manual_seed(1))
    return batch, adv


def _train(mode: str, batch, adv):
    """STEPS AdamW steps at LR on the fixed batch; returns (initial, final) trained weights in float32."""
    model, _ = build_tiny("tiny-qwen3", seed=0)
    select_layers(model, "middle:1")
    if mode == "mixed":
        precision = Precision(torch.bfloat16, torch.bfloat16, "cpu")
        precision.apply(model)
    else:
        precision = Precision()
        if mode == "bf16-weights":  # what `--dtype bfloat16` did before: AdamW on bf16 weights
            model.to(torch.bfloat16)
    params = trainable_parameters(model)
    before = [p.detach().float().clone() for p in params]
    fingerprint = fingerprint_frozen(model)
    opt = torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        with precision.autocast():
            logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len)
        loss, _ = policy_loss(logp, batch.logprobs, adv, batch.completion_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert frozen_unchanged(model, fingerprint)[0]
    return model, before, [p.detach().float() for p in params], opt


def _delta(before, after):
    return torch.cat([(a - b).reshape(-1) for b, a in zip(before, after)])


@pytest.mark.slow
def test_mixed_precision_moves_weights_like_fp32_and_bf16_adamw_does_not():
    batch, adv = _fixed_batch()
    _, b32, a32, _ = _train("fp32", batch, adv)
    model, bmix, amix, opt = _train("mixed", batch, adv)
    _, bbf, abf, _ = _train("bf16-weights", batch, adv)
    d32, dmix, dbf = _delta(b32, a32), _delta(bmix, amix), _delta(bbf, abf)
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(dmix, d32, dim=0)) >= 0.99
    assert float(cos(dbf, d32, dim=0)) < 0.9
    # bf16 weights keep only a small part of the intended update; fp32 master weights keep it all
    assert float((dbf != 0).float().mean()) < 0.5 < float((dmix != 0).float().mean())
    # the layout: trainable tensors and their AdamW moments in float32, frozen tensors in bfloat16
    for p in model.parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    assert all(t.dtype == torch.float32 for st in opt.state.values() for k, t in st.items() if k != "step")


def test_float32_precision_is_a_no_op():
    model, _ = build_tiny("tiny-qwen3", seed=0)
    select_layers(model, "middle:1")
    Precision().apply(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not Precision().mixed and Precision(torch.bfloat16).mixed
