"""The fast paths must not change the numbers: the lean Llama-family forward (rollout and training),
frozen-prefix reuse, and the benchmark's bookkeeping (FLOPs, optimizer bytes)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from onelayer.models.layers import select_layers
from onelayer.models.prefix import reuse_block, start_at_block
from onelayer.rollout import sample
from onelayer.policy import lean_available, lean_support, sequence_block_input, sequence_logprobs

PAD, EOS, V = 0, 1, 60
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]
SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=V, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {
        "qwen3": lambda: Qwen3Config(head_dim=16, **SHAPE),
        "qwen2": lambda: Qwen2Config(**SHAPE),  # biases on q/k/v
        "llama": lambda: LlamaConfig(**SHAPE),
    }[kind]()
    return AutoModelForCausalLM.from_config(cfg)


def rollout(model, capture=None, lean=True, seed=0):
    return sample(model, PROMPTS, num_generations=3, max_new_tokens=12, temperature=0.9, eos_id=EOS, pad_id=PAD,
                  generator=torch.Generator().manual_seed(seed), capture_block=capture, lean=lean)


def logprobs_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=0.9, **kw)
    (lp * batch.completion_mask).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, mask, tol=1e-5):
    assert (((a - b).abs() * mask).max().item()) < tol


def assert_grads_close(ga: dict, gb: dict, rel=1e-4):
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-12
        assert (ga[name] - gb[name]).abs().max().item() / scale < rel, name


# ---------------------------------------------------------------------------------------------- lean path


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


# ------------------------------------------------------------------------------------ frozen-prefix reuse


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


# ------------------------------------------------------------------------------------------- benchmark


def test_step_flops_counts_what_torch_counts():
    """The floor's matmul FLOPs for the update phase, against torch's FLOP counter on the model's own forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from onelayer.bench import step_flops

    model = build("llama")
    ids = torch.randint(2, V, (6, 10))  # 2 prompts x G=3, prompt 4 + completion 6
    select_layers(model, "all", train_non_block=True)
    counter = FlopCounterMode(display=False)
    with counter:
        lp = sequence_logprobs(model, ids, torch.ones_like(ids), 4, lean=False)
        lp.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for k, v in counts.items() if str(k).split(".")[1] in ("mm", "addmm"))
    ours = step_flops(model.config, prompt_lens=[4, 4], num_generations=3, new_tokens=6, lowest_trainable=0,
                      trainable_blocks=4, train_head=True, parts=True)["update_linear"]
    # torch's head matmul also covers the prompt's last position predicting the first completion token
    assert ours == pytest.approx(linear, rel=0.02)


def test_bench_reports_ratios_and_optimizer_bytes(tmp_path):
    """`onelayer bench` end to end on the small model: ratios, phases, floor and memory are all reported
    (with TRL when it is installed; the bench extra installs it)."""
    from onelayer.bench import trl_available
    from onelayer.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--models", "tiny-qwen3", "--steps", "5", "--warmup", "1", "--threads", "1", "--rounds", "1",
            "--json", str(out)]
    assert main(args + ([] if trl_available() else ["--no-trl"])) == 0
    result = json.loads(out.read_text())
    keys = ["layer_update_vs_full_update", "full_vs_floor"] + (["full_vs_trl", "layer_vs_trl"] if trl_available() else [])
    assert all(result[k] > 0 for k in keys)
    runs = result["models"]["tiny-qwen3"]["runs"]
    assert set(runs["onelayer/all"]["phases_s"]) == {"rollout", "reward", "logprob", "update"}
    assert len(runs["onelayer/all"]["step_s"]) == 5
    assert 0 < result["optimizer_bytes_layer"] < result["optimizer_bytes_full"]
    assert result["flops_layer"]["update"] < result["flops_full"]["update"]
    assert result["flops_layer"]["rollout"] == result["flops_full"]["rollout"]


def test_bench_rejects_bad_arguments(capsys):
    from onelayer.cli import main

    assert main(["bench", "--models", "gpt-17", "--no-trl"]) == 2
    assert "not a built-in tiny model" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny-qwen3", "--steps", "3", "--no-trl"]) == 2
    assert "at least 5" in capsys.readouterr().err


def test_bench_without_trl_says_how_to_install_it(monkeypatch, capsys):
    import onelayer.bench as bench
    from onelayer.cli import main

    monkeypatch.setattr(bench, "trl_available", lambda: False)
    assert main(["bench", "--models", "tiny-qwen3"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'onelayer[bench]'" in err and "--no-trl" in err and "Traceback" not in err


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


def test_trainer_drives_a_drop_in_sampler_like_vllm(tmp_path, monkeypatch):
    """The rollout_backend hook: the trainer syncs weights into the sampler before every rollout, asks it
    for no hidden states, and computes the frozen prefix once per batch itself."""
    import onelayer.train.loop as loop
    from onelayer.config import TrainConfig

    calls = {"sync": 0, "sample": 0}

    class FakeEngine:
        captures_hidden_states = False

        def sync_weights(self, model):
            calls["sync"] += 1
            assert all(p.requires_grad == n.startswith("model.layers.3.") for n, p in model.named_parameters())

        def __call__(self, model, prompts, **kw):
            assert "capture_block" not in kw  # an engine hands out no hidden states
            calls["sample"] += 1
            return sample(model, prompts, **kw)

    monkeypatch.setattr(loop, "rollout_sampler", lambda *a, **k: FakeEngine())
    cfg = TrainConfig(layers="3", warm_start=False, max_steps=2, prompts_per_step=4, num_generations=4,
                      max_completion_length=8, task_opts={"n_eval": 8}, progress=False, save_every=100, threads=1)
    record = loop.run(cfg, tmp_path / "run", log=lambda *_: None)
    assert calls == {"sync": 2, "sample": 2}
    assert record["frozen_unchanged"]
