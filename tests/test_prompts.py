"""Prompt formats (raw, fewshot, chat), answer extraction, and stop strings in rollouts."""

import pytest
import torch

from onelayer import tasks
from onelayer.models import build_tiny
from onelayer.rollout import RolloutBatch, stop_token_ids, truncate_at_stops
from onelayer.tasks import TaskError
from onelayer.tasks.arith import _answer
from onelayer.tasks.prompts import PromptFormat, chat_number, cut_at_stop, default_format, first_number, formatted


def test_number_extraction():
    assert first_number("  81\n") == "81" and first_number("-3 apples") == "-3" and first_number("none") is None
    assert chat_number("The answer is 12.") == "12"
    assert chat_number(r"so we get \boxed{7}") == "7"
    assert chat_number("3 apples and then 12 more makes 15") == "15"
    assert chat_number("no digits") is None
    assert cut_at_stop("12\n13", ("\n",)) == "12" and cut_at_stop("12", ("\n",)) == "12"


def test_fewshot_uses_train_items_only_and_never_the_item_itself():
    _, tok = build_tiny("tiny-qwen3")
    task = tasks.make("arith", difficulty=7)
    fmt = formatted(task, tok, PromptFormat("fewshot", shots=3))
    eval_ids = {it["id"] for it in task.items("eval")}
    for split in ("train", "eval"):
        for it in fmt.items(split)[:50]:
            lines = it["prompt"].split("\n")
            assert len(lines) == 4 and lines[-1] == it["raw_prompt"]
            shown = [ln.split("=")[0] for ln in lines[:-1]]
            assert it["id"] not in shown and not set(shown) & eval_ids
            assert all(ln == f"{p}={_answer(p)}" for p, ln in zip(shown, lines))
    # the same examples every time (a fixed seed), and the answer is the first number before the newline
    assert fmt.items("eval")[0]["prompt"] == formatted(task, tok, PromptFormat("fewshot", shots=3)).items("eval")[0]["prompt"]
    item = fmt.items("eval")[0]
    assert fmt.score(item, f"{item['answer']}\n9+9=18") == 1.0 and fmt.score(item, f"x\n{item['answer']}") == 0.0
    assert fmt.stop_strings == ("\n",)


def test_format_errors_and_defaults():
    _, tok = build_tiny("tiny-qwen3")
    task = tasks.make("arith")
    with pytest.raises(TaskError, match="chat template"):
        formatted(task, tok, PromptFormat("chat"))  # the character tokenizer has no chat template
    with pytest.raises(TaskError, match="unknown prompt_format 'poem'"):
        PromptFormat("poem")
    assert formatted(task, tok, PromptFormat("raw")) is task
    assert default_format("tiny-qwen3", tok, task) == "raw"
    assert default_format("runs/x/model", tok, task) == "raw"  # a character-level model saved to a directory


def test_a_trained_model_keeps_its_format(tmp_path):
    import json

    from onelayer.tasks.prompts import TRAINED_FORMAT_FILE

    _, tok = build_tiny("tiny-qwen3")
    (tmp_path / TRAINED_FORMAT_FILE).write_text(json.dumps({"prompt_format": "fewshot"}))
    assert default_format(str(tmp_path), tok, tasks.make("arith")) == "fewshot"


def test_stop_tokens_end_rows_and_spread_stop_strings_are_cut_with_their_logprobs():
    _, tok = build_tiny("tiny-qwen3")
    ids = stop_token_ids(tok, ("\n",))
    assert [tok.decode([i]) for i in ids.tolist()] == ["\n"]
    # a stop string spread over two tokens ("2" then "\n" in "12\n34") is only visible in the text
    prompt = torch.tensor([tok("5+7=", add_special_tokens=False).input_ids])
    comp = torch.tensor([tok("12\n34", add_special_tokens=False).input_ids, tok("12345", add_special_tokens=False).input_ids])
    batch = RolloutBatch.assemble(prompt, torch.ones_like(prompt), comp, torch.ones_like(comp, dtype=torch.bool),
                                  torch.full(comp.shape, -0.5), num_generations=2)
    cut = truncate_at_stops(tok, batch, ("2\n",))
    assert cut.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert cut.logprobs[0, 3:].abs().sum() == 0 and cut.logprobs[1].sum() == -2.5
    assert cut.attention_mask[0, batch.prompt_len:].tolist() == [1, 1, 1, 0, 0]
    assert cut.completion_lengths.tolist() == [3, 5]
    assert truncate_at_stops(tok, batch, ()) is batch


def test_sampler_stops_on_stop_tokens():
    from onelayer.rollout import sample

    model, tok = build_tiny("tiny-qwen3", seed=0)
    prompts = [tok("1+2=", add_special_tokens=False).input_ids]
    free = sample(model, prompts, num_generations=16, max_new_tokens=12, eos_id=None, pad_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    # stop on whatever token the free rollout drew most often: every row must end at its first occurrence
    stop = torch.tensor([int(free.completion_ids[:, :4].flatten().mode().values)])
    b = sample(model, prompts, num_generations=16, max_new_tokens=12, eos_id=None, pad_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(0), stop_ids=stop)
    for row in range(16):
        n = int(b.completion_mask[row].sum())
        toks = b.completion_ids[row, :n].tolist()
        assert stop.item() not in toks[:-1] and (toks[-1] == stop.item() or n == 12)
