"""Frozen-prefix reuse (onelayer.models.prefix): the update forward starts at the lowest trained block from
hidden states captured during the rollout, and must give the same log-probs, gradients and training run."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_grads_close, build, logprobs_and_grads, rollout
from onelayer.models.layers import select_layers
from onelayer.models.prefix import reuse_block, start_at_block
from onelayer.policy import sequence_block_input


def test_reuse_block_only_when_everything_below_is_frozen():
    model = build("qwen3")
    select_layers(model, "all", train_non_block=True)
    assert reuse_block(model) is None
    select_layers(model, "0")
    assert reuse_block(model) is None
    select_layers(model, "2-3")
    assert reuse_block(model) == 2
    select_layers(model, "2", train_embeddings=True)
    assert reuse_block(model) is None
    select_layers(model, "1,3")
    assert reuse_block(model) == 1



@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf-forward"])
def test_reuse_gives_the_same_logprobs_and_gradients(lean):
    """The reuse-equivalence check: log-probs and gradients with the prefix captured during the rollout
    (or computed once) equal those of a full forward."""
    model = build("qwen3", seed=1)
    select_layers(model, "2")
    batch = rollout(model, capture=2, lean=lean)
    assert batch.block_input is not None and batch.block_input.shape[:2] == batch.input_ids.shape
    model.train()
    lp_full, g_full = logprobs_and_grads(model, batch, lean=lean)
    lp_reuse, g_reuse = logprobs_and_grads(model, batch, lean=lean, block_input=batch.block_input, block_index=2,
                                           prompt_index=batch.prompt_index)
    assert_close(lp_full, lp_reuse, batch.completion_mask)
    assert_close(batch.logprobs, lp_reuse, batch.completion_mask)
    assert_grads_close(g_full, g_reuse)
    assert all(name.startswith("model.layers.2.") for name in g_reuse)  # frozen tensors get no gradients
    # computing the prefix once per batch (episodes do this) gives the captured states
    computed = sequence_block_input(model, batch.input_ids, batch.attention_mask, 2)
    fed = batch.attention_mask.bool().clone()
    fed[:, -1] = False  # the last sampled token is never fed back during the rollout
    assert (computed - batch.block_input)[fed].abs().max() < 1e-5



def test_start_at_block_restores_the_model_and_checks_shapes():
    model = build("llama")
    blocks = list(model.model.layers)
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = sequence_block_input(model, ids, torch.ones_like(ids), 2)
    for block in blocks:
        block.attention_type = "full_attention"  # transformers 4.5x forwards read this from every block
    with start_at_block(model, 2, hidden):
        assert not isinstance(model.model.layers[0], type(blocks[0]))
        assert [b.attention_type for b in model.model.layers] == ["full_attention"] * len(blocks)
    assert list(model.model.layers) == blocks
    with pytest.raises(ValueError, match="does not match"), start_at_block(model, 2, hidden[:, :2]):
        model(input_ids=ids)
    assert list(model.model.layers) == blocks



@pytest.mark.slow
def test_training_with_and_without_reuse_is_identical(tmp_path):
    from onelayer.config import TrainConfig
    from onelayer.io import read_jsonl
    from onelayer.train.loop import run

    records, weights, metrics = {}, {}, {}
    for reuse in (True, False):
        cfg = TrainConfig(layers="3", prefix_reuse=reuse, warm_start=False, max_steps=3, prompts_per_step=4,
                          num_generations=4, max_completion_length=8, task_opts={"n_eval": 8}, num_iterations=2,
                          beta=0.05, progress=False, save_every=100, threads=1)
        out = tmp_path / f"reuse-{reuse}"
        records[reuse] = run(cfg, out, log=lambda *_: None)
        metrics[reuse] = read_jsonl(out / "metrics.jsonl")
        from safetensors.torch import load_file

        weights[reuse] = load_file(str(out / "model" / "model.safetensors"))
    for a, b in zip(metrics[True], metrics[False]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
        # AdamW state exists for the trainable tensors only: two fp32 moments + a step counter for each of
        # the block's 11 tensors
        assert a["optimizer_bytes"] == b["optimizer_bytes"] == 8 * records[True]["trainable_params"] + 4 * 11
    for name in weights[True]:
        assert torch.allclose(weights[True][name], weights[False][name], atol=1e-5), name
    assert records[True]["frozen_unchanged"] and records[False]["frozen_unchanged"]

