"""Tests for onelayer.rollout.sampling on tiny randomly initialised Qwen3 models (no hub, no tokenizer)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from onelayer.policy import sequence_logprobs
from onelayer.rollout import RolloutBatch, left_pad, sample

PAD, EOS, VOCAB = 0, 1, 50
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]


def tiny_model(seed: int = 0, **overrides):
    kw = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )
    kw.update(overrides)
    attn = kw.pop("attn_implementation", None)
    torch.manual_seed(seed)
    cfg = Qwen3Config(**kw)
    if attn is None:
        return AutoModelForCausalLM.from_config(cfg).eval()
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def eos_bias(model, bias: float):
    """Add `bias` to the EOS logit (a hook on lm_head, so sample and sequence_logprobs both see it)."""
    vec = torch.zeros(VOCAB)
    vec[EOS] = bias
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + vec.to(out))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_logprobs_match(model, batch: RolloutBatch, temperature: float, tol: float = 1e-5):
    """Behaviour log-probs against one full forward of the model's own (HF) implementation."""
    with torch.no_grad():
        ref = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=temperature,
                                lean=False)
    m = batch.completion_mask.bool()
    assert ref.shape == batch.logprobs.shape
    assert m.any()
    assert (ref[m] - batch.logprobs[m]).abs().max().item() < tol
    assert (batch.logprobs[~m] == 0).all() and (ref[~m] == 0).all()


def check_layout(batch: RolloutBatch, prompts, G: int, pad_id: int = PAD, eos_id: int = EOS):
    """Shapes, grouping, masks and padding after EOS."""
    N, P = len(prompts), batch.prompt_len
    B, T = batch.completion_ids.shape
    assert B == N * G and batch.input_ids.shape == (B, P + T) == batch.attention_mask.shape
    assert torch.equal(batch.prompt_index, torch.arange(N).repeat_interleave(G))
    ids, mask = left_pad(prompts, pad_id)
    assert torch.equal(batch.input_ids[:, :P], ids.repeat_interleave(G, 0))
    assert torch.equal(batch.attention_mask[:, :P], mask.repeat_interleave(G, 0))
    assert torch.equal(batch.input_ids[:, P:], batch.completion_ids)
    assert torch.equal(batch.attention_mask[:, P:].float(), batch.completion_mask)
    for row, cm, length in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist(), batch.completion_lengths):
        first_eos = row.index(eos_id) if eos_id in row else None
        expected = T if first_eos is None else first_eos + 1
        assert length == expected == sum(cm)
        assert cm == [1.0] * expected + [0.0] * (T - expected)
        assert all(tok == pad_id for tok in row[expected:])


def test_left_pad():
    ids, mask = left_pad([[3, 4], [5], [6, 7, 8]], pad_id=0)
    assert ids.tolist() == [[0, 3, 4], [0, 0, 5], [6, 7, 8]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf-forward"])
def test_logprobs_match_sequence_logprobs(model, temperature, top_p, lean):
    # top_p < 1: the behaviour log-prob is of the temperature-scaled distribution, not the top-p renormalised one.
    batch = sample(model, PROMPTS, num_generations=3, max_new_tokens=10, temperature=temperature, top_p=top_p,
                   eos_id=EOS, pad_id=PAD, generator=gen(0), lean=lean)
    check_layout(batch, PROMPTS, 3)
    check_logprobs_match(model, batch, temperature)


def test_logprobs_match_with_rows_finishing_at_different_times():
    # EOS likely (~20%/step): rows stop at different steps and finished rows are dropped from the batch.
    model = tiny_model(seed=1)
    handle = eos_bias(model, 2.5)
    try:
        batch = sample(model, PROMPTS * 4, num_generations=4, max_new_tokens=16, temperature=0.9, top_p=0.9,
                       eos_id=EOS, pad_id=PAD, generator=gen(3))
        lengths = batch.completion_lengths
        assert lengths.min() < lengths.max(), "rows should finish at different steps"
        check_layout(batch, PROMPTS * 4, 4)
        check_logprobs_match(model, batch, 0.9)
    finally:
        handle.remove()


def test_top_p_restricts_support(model):
    # top_p tiny: only the most likely token survives, so sampling is greedy.
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=6, top_p=1e-6, eos_id=-1, pad_id=PAD,
                   generator=gen(0))
    greedy = sample(model, PROMPTS, num_generations=2, max_new_tokens=6, greedy=True, eos_id=-1, pad_id=PAD)
    assert torch.equal(batch.completion_ids, greedy.completion_ids)


@pytest.mark.parametrize("eos_id", [-1, EOS])
def test_greedy_matches_generate(eos_id):
    model = tiny_model(seed=2)
    handle = eos_bias(model, 1.5) if eos_id >= 0 else None
    try:
        T = 12
        batch = sample(model, PROMPTS, max_new_tokens=T, greedy=True, eos_id=eos_id, pad_id=PAD)
        ids, mask = left_pad(PROMPTS, PAD)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=T,
                                 eos_token_id=eos_id if eos_id >= 0 else None, pad_token_id=PAD,
                                 top_k=None, top_p=None, temperature=None)
        theirs = out[:, ids.shape[1]:]
        assert torch.equal(batch.completion_ids, theirs)
        check_layout(batch, PROMPTS, 1, eos_id=eos_id)
        check_logprobs_match(model, batch, 1.0)  # greedy log-probs are at temperature 1
    finally:
        if handle is not None:
            handle.remove()


def test_eos_forced_first_step():
    model = tiny_model(seed=3)
    handle = eos_bias(model, 100.0)
    try:
        batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=8, eos_id=EOS, pad_id=PAD, generator=gen(0))
    finally:
        handle.remove()
    # Every row emits EOS at step 0, so decoding stops after one step.
    assert batch.completion_ids.tolist() == [[EOS]] * 8
    assert batch.completion_mask.tolist() == [[1.0]] * 8
    assert batch.completion_lengths.tolist() == [1] * 8
    assert batch.attention_mask[:, -1].tolist() == [1] * 8
    check_layout(batch, PROMPTS, 2)


def test_eos_masks_and_padding_after_eos():
    model = tiny_model(seed=4)
    handle = eos_bias(model, 3.0)
    try:
        batch = sample(model, PROMPTS, num_generations=4, max_new_tokens=20, eos_id=EOS, pad_id=PAD,
                       generator=gen(1))
    finally:
        handle.remove()
    assert (batch.completion_lengths < 20).all()
    check_layout(batch, PROMPTS, 4)
    # pad after EOS and log-probs zero there
    after = batch.completion_mask == 0
    assert after.any()
    assert (batch.completion_ids[after] == PAD).all()
    assert (batch.logprobs[after] == 0).all()
    assert (batch.logprobs[~after] < 0).all()


def test_pad_equal_to_eos():
    model = tiny_model(seed=4)
    handle = eos_bias(model, 3.0)
    try:
        batch = sample(model, PROMPTS, num_generations=4, max_new_tokens=20, eos_id=EOS, pad_id=EOS,
                       generator=gen(1))
    finally:
        handle.remove()
    check_layout(batch, PROMPTS, 4, pad_id=EOS, eos_id=EOS)


def test_no_eos_runs_full_length(model):
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=7, eos_id=-1, pad_id=PAD, generator=gen(0))
    assert batch.completion_ids.shape == (8, 7)
    assert (batch.completion_mask == 1).all() and (batch.completion_lengths == 7).all()


def test_seed_reproducibility(model):
    kw = dict(num_generations=4, max_new_tokens=10, temperature=1.0, eos_id=EOS, pad_id=PAD)
    a = sample(model, PROMPTS, generator=gen(123), **kw)
    b = sample(model, PROMPTS, generator=gen(123), **kw)
    c = sample(model, PROMPTS, generator=gen(124), **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_grouping_layout(model):
    prompts = [[5, 6], [7, 8, 9, 10], [11]]
    batch = sample(model, prompts, num_generations=5, max_new_tokens=4, eos_id=EOS, pad_id=PAD, generator=gen(0))
    assert batch.prompt_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert batch.num_generations == 5
    check_layout(batch, prompts, 5)
    # samples of one prompt differ from each other (they are independent draws)
    assert len({tuple(r) for r in batch.completion_ids[:5].tolist()}) > 1


def test_restores_training_mode(model):
    model.train()
    try:
        sample(model, PROMPTS, max_new_tokens=2, eos_id=EOS, pad_id=PAD, generator=gen(0))
        assert model.training
    finally:
        model.eval()
    sample(model, PROMPTS, max_new_tokens=2, eos_id=EOS, pad_id=PAD, generator=gen(0))
    assert not model.training


def test_sequence_logprobs_is_differentiable(model):
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=5, eos_id=EOS, pad_id=PAD, generator=gen(0))
    logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=0.7)
    assert logp.requires_grad and logp.shape == batch.completion_ids.shape
    (logp * batch.completion_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_sequence_logprobs_matches_naive_full_softmax(model):
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=6, eos_id=EOS, pad_id=PAD, generator=gen(5))
    P = batch.prompt_len
    with torch.no_grad():
        ours = sequence_logprobs(model, batch.input_ids, batch.attention_mask, P, temperature=0.5)
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
        naive = torch.log_softmax(logits[:, P - 1 : -1] / 0.5, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    m = batch.completion_mask.bool()
    assert (ours[m] - naive[m]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"attn_implementation": "eager"},  # additive float mask path
        # sliding-window layers: falls back to a DynamicCache and the model's own mask builder
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
    ],
    ids=["eager", "sliding-window"],
)
def test_other_attention_setups(overrides):
    model = tiny_model(seed=6, **overrides)
    batch = sample(model, PROMPTS, num_generations=2, max_new_tokens=8, temperature=0.8, eos_id=EOS, pad_id=PAD,
                   generator=gen(0))
    check_layout(batch, PROMPTS, 2)
    check_logprobs_match(model, batch, 0.8)
    greedy = sample(model, PROMPTS, max_new_tokens=8, greedy=True, eos_id=-1, pad_id=PAD)
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                             eos_token_id=None, pad_token_id=PAD, top_k=None, top_p=None, temperature=None)
    assert torch.equal(greedy.completion_ids, out[:, ids.shape[1]:])


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError):
        sample(model, PROMPTS, max_new_tokens=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError):
        sample(model, PROMPTS, max_new_tokens=3, temperature=0.0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError):
        sample(model, PROMPTS, max_new_tokens=3, top_p=0.0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError):
        sample(model, PROMPTS, num_generations=0, max_new_tokens=3, eos_id=EOS, pad_id=PAD)


@pytest.mark.parametrize("lean", [True, False])
def test_repeated_prompts_are_prefilled_once(model, monkeypatch, lean):
    """A batch that repeats prompts (agent turns in states several episodes reached) prefills each distinct
    prompt once; greedy tokens and log-probs equal those of the distinct prompts sampled alone."""
    from onelayer.rollout import steppers

    seen = []
    for cls in (steppers._LeanStepper, steppers._HFStepper):
        original = cls.prefill

        def spy(self, ids, pmask, rows, original=original):
            seen.append(ids.shape[0])
            return original(self, ids, pmask, rows)
        monkeypatch.setattr(cls, "prefill", spy)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    kw = dict(num_generations=2, max_new_tokens=6, greedy=True, eos_id=EOS, pad_id=PAD, lean=lean)
    batch = sample(model, prompts, **kw)
    assert seen == [3]  # three distinct prompts
    check_layout(batch, prompts, 2)
    check_logprobs_match(model, batch, 1.0)
    alone = {i: sample(model, [PROMPTS[i]], **kw) for i in (0, 1, 3)}
    for r, p in enumerate(prompts):
        one = alone[PROMPTS.index(p)]
        assert batch.completion_ids[2 * r: 2 * r + 2].tolist() == one.completion_ids[:, :batch.completion_ids.shape[1]].tolist()
