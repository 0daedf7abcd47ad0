"""Tests for the optional vLLM rollout backend (onelayer.rollout.vllm_backend).

Without vLLM (the usual case on CPU machines): onelayer never imports it, the sampler refuses to build with
a one-line ConfigError, and the pure conversion of vLLM outputs into a RolloutBatch is checked against
`onelayer.rollout.sample` field by field. The engine-facing code is exercised with a fake `vllm` module.
A real-engine smoke test runs only where vLLM and a CUDA GPU are present.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from onelayer.config import ConfigError
from onelayer.policy import sequence_logprobs
from onelayer.rollout import RolloutBatch, sample
from onelayer.rollout.vllm_backend import (
    VLLM_MISSING,
    VLLMSampler,
    outputs_to_batch,
    policy_dir,
    recompute_logprobs,
    require_vllm,
    vllm_available,
)

PAD, EOS, VOCAB = 0, 1, 50
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]
HAS_VLLM_GPU = vllm_available() and torch.cuda.is_available()


def tiny_model(seed: int = 0, **overrides):
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
              intermediate_size=128, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen3Config(**kw)).eval()


def eos_bias(model, bias: float):
    vec = torch.zeros(model.config.vocab_size)
    vec[EOS] = bias
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + vec.to(out))


def fake_outputs(rows: list[tuple[list[int], list[float] | None]], G: int):
    """vLLM-shaped RequestOutputs: one per prompt, G CompletionOutputs each, logprobs as {token: obj}."""
    comps = [SimpleNamespace(token_ids=list(toks),
                             logprobs=None if lps is None else
                             [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(toks, lps)])
             for toks, lps in rows]
    return [SimpleNamespace(outputs=comps[i:i + G]) for i in range(0, len(comps), G)]


def rows_of(batch: RolloutBatch):
    """Each row's completion tokens up to its end (EOS included) and their log-probs, as vLLM returns them."""
    out = []
    for toks, lps, n in zip(batch.completion_ids.tolist(), batch.logprobs.tolist(), batch.completion_lengths.tolist()):
        out.append((toks[:n], lps[:n]))
    return out


def assert_same_batch(a: RolloutBatch, b: RolloutBatch, atol: float = 0.0):
    assert a.prompt_len == b.prompt_len
    for f in fields(RolloutBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not torch.is_tensor(x):
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, f.name
        if x.is_floating_point():
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=f.name)
        else:
            assert torch.equal(x, y), f.name


# --- the import guard ----------------------------------------------------------------------------------

def test_onelayer_never_imports_vllm():
    code = textwrap.dedent("""
        import sys
        import onelayer, onelayer.rollout, onelayer.rollout.vllm_backend, onelayer.cli
        from onelayer.rollout.vllm_backend import vllm_available
        vllm_available()
        assert "vllm" not in sys.modules, "importing onelayer imported vllm"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_vllm_reported_missing():
    assert vllm_available() is False


def test_vllm_available_sees_an_installed_package(tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert vllm_available() is True  # found without importing it (importing would raise)


@pytest.mark.skipif(HAS_VLLM_GPU, reason="vLLM and a GPU are present")
def test_sampler_without_vllm_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        VLLMSampler(str(tmp_path))
    assert str(err.value) == VLLM_MISSING
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs vLLM and a GPU"):
        require_vllm()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_vllm_installed_but_no_gpu_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs vLLM and a GPU"):
        VLLMSampler("some/model")


# --- outputs_to_batch: the pure conversion ----------------------------------------------------------------

def test_outputs_to_batch_by_hand():
    prompts = [[5, 6, 7], [8]]
    rows = [([3, EOS], [-0.1, -0.2]),   # prompt 0: stops at EOS
            ([4, 4, 4], [-1.0, -2.0, -3.0]),  # prompt 0: ran out of tokens, no EOS
            ([EOS], [-0.5]),  # prompt 1: EOS first
            ([2, EOS, 9], [-0.3, -0.4, -9.0])]  # prompt 1: anything after a first EOS is dropped
    b = outputs_to_batch(fake_outputs(rows, 2), prompts, num_generations=2, eos_id=EOS, pad_id=PAD)
    assert b.prompt_len == 3
    assert b.input_ids.tolist() == [[5, 6, 7, 3, EOS, PAD], [5, 6, 7, 4, 4, 4],
                                    [PAD, PAD, 8, EOS, PAD, PAD], [PAD, PAD, 8, 2, EOS, PAD]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1],
                                         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert b.completion_ids.tolist() == [[3, EOS, PAD], [4, 4, 4], [EOS, PAD, PAD], [2, EOS, PAD]]
    assert b.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(b.logprobs, torch.tensor([[-0.1, -0.2, 0], [-1, -2, -3], [-0.5, 0, 0], [-0.3, -0.4, 0]]))
    assert b.completion_lengths.tolist() == [2, 3, 1, 2]
    assert b.prompt_index.tolist() == [0, 0, 1, 1]
    assert b.num_generations == 2
    assert (b.input_ids.dtype, b.attention_mask.dtype, b.completion_ids.dtype) == (torch.long,) * 3
    assert (b.completion_mask.dtype, b.logprobs.dtype) == (torch.float32, torch.float32)
    assert (b.completion_lengths.dtype, b.prompt_index.dtype) == (torch.long, torch.long)


def test_outputs_to_batch_without_eos_or_logprobs():
    rows = [([EOS, 3], None), ([4], None)]
    b = outputs_to_batch(fake_outputs(rows, 1), [[5], [6, 7]], num_generations=1, eos_id=None, pad_id=PAD)
    assert b.completion_ids.tolist() == [[EOS, 3], [4, PAD]]  # no EOS id: nothing truncated
    assert b.completion_lengths.tolist() == [2, 1]
    assert (b.logprobs == 0).all()
    assert b.prompt_index.tolist() == [0, 1]


def test_outputs_to_batch_rejects_wrong_counts():
    rows = [([3], [-1.0])] * 3
    with pytest.raises(ValueError, match="3 vLLM outputs for 2 prompts"):
        outputs_to_batch(fake_outputs(rows, 1), [[5], [6]], num_generations=1, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="expected num_generations=2"):
        outputs_to_batch(fake_outputs(rows, 3), [[5]], num_generations=2, eos_id=EOS, pad_id=PAD)


@pytest.mark.parametrize("eos_id,bias", [(EOS, 2.5), (None, 0.0)])
def test_outputs_to_batch_matches_sample_layout(eos_id, bias):
    # The same completions laid out by `sample` and by the vLLM path give identical batches, field by field.
    model = tiny_model(seed=1)
    handle = eos_bias(model, bias)
    try:
        G = 3
        ref = sample(model, PROMPTS, num_generations=G, max_new_tokens=12, temperature=0.9, eos_id=eos_id,
                     pad_id=PAD, generator=torch.Generator().manual_seed(3))
        if eos_id is not None:
            assert ref.completion_lengths.min() < ref.completion_lengths.max(), "rows should end at different steps"
        got = outputs_to_batch(fake_outputs(rows_of(ref), G), PROMPTS, num_generations=G, eos_id=eos_id, pad_id=PAD)
        assert_same_batch(got, ref)
        # and the recomputed (training-side) log-probs are the behaviour log-probs `sample` reported
        torch.testing.assert_close(recompute_logprobs(model, got, temperature=0.9), ref.logprobs, atol=1e-5, rtol=0)
    finally:
        handle.remove()


def test_policy_dir(tmp_path):
    saved = []
    obj = SimpleNamespace(save_pretrained=lambda d: saved.append(str(d)))
    assert policy_dir(obj, obj, str(tmp_path), tmp_path / "x") == str(tmp_path)  # a directory: as is
    assert policy_dir(obj, obj, "Qwen/Qwen3-0.6B", tmp_path / "x") == "Qwen/Qwen3-0.6B"  # a hub name: as is
    assert not saved
    assert policy_dir(obj, obj, "tiny-qwen3", tmp_path / "x") == str(tmp_path / "x")  # built-in: saved first
    assert saved == [str(tmp_path / "x")] * 2  # model and tokenizer


# --- the engine-facing code, against a fake vllm module -----------------------------------------------------

class FakeLLM:
    """Records calls; `generate` replays completions given by `script(prompt_ids, params) -> [(ids, lps)]*n`."""

    def __init__(self, script):
        self.script, self.calls, self.loaded, self.resets = script, [], [], 0
        engine_model = SimpleNamespace(load_weights=lambda ws: self.loaded.extend((n, t.clone()) for n, t in ws))
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=engine_model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            rows = self.script(p["prompt_token_ids"], sp)
            outs.append(fake_outputs(rows, sp.n)[0])
        return outs

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(**kw)
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return vllm


def fake_sampler(script, recompute: bool) -> VLLMSampler:
    s = VLLMSampler.__new__(VLLMSampler)  # skips building an engine
    s.llm, s.recompute_logprobs = FakeLLM(script), recompute
    return s


def test_sampler_sampling_params_and_layout(fake_vllm):
    def script(prompt, sp):
        return [([prompt[-1], EOS] if j % 2 else [prompt[-1]] * sp.max_tokens, [-0.5] * (2 if j % 2 else sp.max_tokens))
                for j in range(sp.n)]

    s = fake_sampler(script, recompute=False)
    b = s.sample(PROMPTS, num_generations=2, max_new_tokens=4, temperature=0.7, top_p=0.9, eos_id=EOS, pad_id=PAD,
                 generator=torch.Generator().manual_seed(0), device="cpu")
    prompts, params = s.llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == PROMPTS
    sp = params[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.logprobs) == (2, 0.7, 0.9, 4, 0)
    assert sp.stop_token_ids == [EOS] and sp.ignore_eos is True and sp.detokenize is False
    seeds = [p.seed for p in params]
    assert seeds == [seeds[0] + 2 * i for i in range(len(PROMPTS))]  # children get seed + j: all distinct
    assert b.completion_ids.shape == (8, 4) and b.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert b.completion_lengths.tolist() == [4, 2] * 4
    # greedy: temperature 0 in vLLM; no generator: no per-request seed
    s.sample(PROMPTS[:1], max_new_tokens=2, greedy=True, eos_id=None, pad_id=PAD, device="cpu")
    sp = s.llm.calls[1][1][0]
    assert (sp.temperature, sp.top_p, sp.seed, sp.stop_token_ids) == (0.0, 1.0, None, None)


def test_sampler_recomputes_logprobs_with_the_policy(fake_vllm):
    model = tiny_model(seed=4)
    s = fake_sampler(lambda p, sp: [([7, 8, EOS], [-9.0] * 3), ([9], [-9.0])], recompute=True)
    with pytest.raises(ValueError, match="policy=model"):
        s.sample(PROMPTS, num_generations=2, max_new_tokens=3, eos_id=EOS, pad_id=PAD)
    model.train()
    b = s(model, PROMPTS, num_generations=2, max_new_tokens=3, temperature=0.8, eos_id=EOS, pad_id=PAD)
    assert model.training, "the policy's training flag is restored"
    with torch.no_grad():
        ref = sequence_logprobs(model.eval(), b.input_ids, b.attention_mask, b.prompt_len, temperature=0.8)
    torch.testing.assert_close(b.logprobs, ref)
    assert (b.logprobs[b.completion_mask.bool()] != -9.0).all()


def test_sync_weights_sends_only_trainable_tensors(fake_vllm):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    s = fake_sampler(lambda p, sp: [], recompute=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1.0)
    sent = s.sync_weights(model)
    names = [n for n, _ in s.llm.loaded]
    assert sent == len(names) > 0 and all(n.startswith("model.layers.1.") for n in names)
    pushed = dict(s.llm.loaded)["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(pushed, model.model.layers[1].mlp.down_proj.weight)
    assert s.llm.resets == 1
    s.sync_weights(model, ["lm_head.weight"])
    assert s.llm.loaded[-1][0] == "lm_head.weight" and s.llm.resets == 2
    with pytest.raises(KeyError, match="not parameters"):
        s.sync_weights(model, ["nope.weight"])


# --- a real engine, where there is one ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not vllm_available() or not torch.cuda.is_available(), reason="needs vLLM and a CUDA GPU")
def test_vllm_smoke_logprobs_and_weight_sync(tmp_path):
    vocab = 256
    model = tiny_model(seed=5, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                       vocab_size=vocab, max_position_embeddings=256).cuda()
    model.save_pretrained(tmp_path)
    sampler = VLLMSampler(tmp_path, dtype="float16", gpu_memory_utilization=0.2, seed=0, max_model_len=128,
                          recompute_logprobs=False, enforce_eager=True)

    def check(temperature):
        b = sampler(model, [[5, 6, 7], [8, 9]], num_generations=4, max_new_tokens=16, temperature=temperature,
                    eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
        assert b.input_ids.device.type == "cuda" and b.completion_ids.shape[0] == 8
        with torch.no_grad():
            ref = sequence_logprobs(model, b.input_ids, b.attention_mask, b.prompt_len, temperature=temperature)
        m = b.completion_mask.bool()
        diff = (ref[m] - b.logprobs[m]).abs()
        assert diff.mean().item() < 1e-2 and diff.max().item() < 5e-2, (diff.mean().item(), diff.max().item())

    check(1.0)
    check(0.7)
    # a change to one layer reaches the engine through sync_weights
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    assert sampler.sync_weights(model) > 0
    check(1.0)


@pytest.mark.skipif(vllm_available(), reason="checks the message shown when vLLM is absent")
def test_train_with_vllm_backend_fails_fast_with_one_line(tmp_path, capsys):
    from onelayer.cli import main

    assert main(["train", "--rollout-backend", "vllm", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'onelayer[vllm]'" in err
    assert not (tmp_path / "run" / "checkpoint").exists()
