"""Ensembles of layer-specialised models: the vote's rules, `Task.answer` (same answer, same score), the answers
a run keeps in eval.json, and `onelayer ensemble` over a tiny sweep (files, caches, one-line errors)."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from onelayer.analysis.ensemble import inconsistent_items, oracle_scores, transpose, vote, vote_scores
from onelayer.cli import main
from onelayer.tasks import RewardFuncTask, make
from onelayer.tasks.prompts import FormattedTask, PromptFormat

FIX = Path(__file__).parent / "fixtures"
TINY = ["--set", "max_steps=1", "--set", "prompts_per_step=2", "--set", "num_generations=2", "--set",
        "max_completion_length=4", "--set", "warm_start=false", "--set", "threads=1", "--set", "progress=false",
        "--task-opt", "n_eval=8"]
CONDITION = "tiny-qwen3/arith/grpo"


# ---------------------------------------------------------------------------------------------- the vote


def test_the_most_common_answer_wins_and_ties_go_to_the_first_voter():
    assert vote(["5", "7", "7"]) == 1  # the first voter that gave the majority answer
    assert vote(["5", "7", "9"]) == 0  # a three-way tie: the highest-ranked voter
    assert vote(["7", "5", "5", "7"]) == 0  # a two-way tie: the tied answer given first
    assert vote(["", "", "3"]) == 2  # no answer does not vote, even as a majority
    assert vote(["", ""]) == 0  # nobody answered: the first voter


def test_the_voted_answer_scores_what_a_voter_that_gave_it_scored():
    answers = [["5", "5", "1", ""], ["7", "5", "2", ""], ["7", "9", "3", ""]]  # [voters][items]
    scores = [[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    assert vote_scores(answers, scores) == [1.0, 1.0, 0.0, 0.0]
    assert oracle_scores(scores) == [1.0, 1.0, 1.0, 0.0]
    assert inconsistent_items(answers, scores) == 0
    assert inconsistent_items([["5"], ["5"]], [[1.0], [0.0]]) == 1  # a task whose answer breaks its promise
    assert transpose([["a", "b"], ["c", "d"], ["e", "f"]]) == [["a", "c", "e"], ["b", "d", "f"]]
    with pytest.raises(ValueError, match="same eval items"):
        vote_scores([["1", "2"], ["1"]], [[1, 0], [1]])


# -------------------------------------------------------------------------------------------- Task.answer


def _same_answer_same_score(task, item, completions):
    answers = [task.answer(item, c) for c in completions]
    scores = task.score_batch([item] * len(completions), completions)
    by_answer = {}
    for a, s in zip(answers, scores):
        assert by_answer.setdefault(a, s) == s, (a, by_answer[a], s)
    return answers, scores


def test_arith_answer_is_the_first_integer_word_as_scored():
    task = make("arith", n_eval=4)
    item = task.items("eval")[0]
    right = item["answer"]
    answers, scores = _same_answer_same_score(task, item, [right, f"{right} and more", f" {right}", "x" + right,
                                                           "12", "12=", "", "-7"])
    assert answers == [right, right, right, "", "12", "", "", "-7"]
    assert scores[:3] == [1.0] * 3 and scores[3:] == [0.0] * 5
    fewshot = FormattedTask(task, None, PromptFormat("fewshot"))  # the format extracts the number first
    assert fewshot.answer(item, f"{right}\n{right}9") == right and fewshot.score(item, f"{right}\n1") == 1.0


def test_math_answer_is_the_parsed_answer_and_equal_parses_score_alike():
    task = make("math", path=str(FIX / "math_small.jsonl"), eval_fraction=0.5)
    item = next(it for it in task.items("train") + task.items("eval") if it["final_answer"] == "\\frac{1}{2}")
    answers, scores = _same_answer_same_score(task, item, ["1/2", "0.5", "\\frac{1}{2}", "The answer is $\\frac{1}{2}$.",
                                                           "3", "56", "", "no number"])
    assert answers[0] == answers[1] == answers[2] and scores[:4] == [1.0] * 4 and scores[4:] == [0.0] * 4
    assert answers[-2:] == ["", ""]
    gsm = make("gsm8k", path=str(FIX / "gsm8k_small.jsonl"), eval_fraction=0.5)
    item = next(it for it in gsm.items("train") + gsm.items("eval") if it["final_answer"] == "1200")
    _same_answer_same_score(gsm, item, ["1200", "1,200", "$1200$", "1201", ""])


def test_code_answers_are_the_programs_run():
    task = make("pyfunc", n_eval=3)
    item = task.items("eval")[0]
    answers, scores = _same_answer_same_score(task, item, [item["solution"], item["solution"], "x", "x+100"])
    assert answers[0] == "def f(x):return " + item["solution"] and scores == [1.0, 1.0, 0.0, 0.0]
    mbpp = make("mbpp", path=str(FIX / "mbpp_small.jsonl"), eval_fraction=0.5)
    item = mbpp.items("eval")[0]
    assert mbpp.answer(item, item["solution"]) == mbpp.program(item, item["solution"])
    _same_answer_same_score(mbpp, item, [item["solution"], item["solution"], "pass"])


def test_reward_function_tasks_compare_whole_completions():
    task = RewardFuncTask(make("arith", n_eval=2), lambda prompts, completions, **_: [float(len(c)) for c in completions])
    item = task.items("eval")[0]
    assert task.answer(item, " 5 ") == " 5 "
    _same_answer_same_score(task, item, ["5", " 5", "5 "])


# ------------------------------------------------------------------------------------- eval.json answers


def test_train_and_eval_keep_each_items_answer(tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4",
            "--task-opt", "n_eval=8", "--no-warm-start", "--threads", "1", "--no-progress", "--no-save-model"]
    assert main(["train", "--out", str(out), *args]) == 0
    rec = json.loads((out / "eval.json").read_text())
    task = make("arith", n_eval=8)
    assert len(rec["item_answers"]) == len(rec["item_ids"]) == 8 and len(rec["base_item_answers"]) == 8
    for item, answer, score in zip(task.items("eval"), rec["item_answers"], rec["item_scores"]):
        assert task.score(item, answer) == score  # an answer scores what its completion scored
    assert json.loads((out / "base_eval.json").read_text())["item_answers"] == rec["base_item_answers"]
    ev = tmp_path / "e.json"
    assert main(["eval", "--out", str(ev), "--task-opt", "n_eval=8", "--no-warm-start", "--max-completion-length", "4",
                 "--threads", "1"]) == 0
    assert len(json.loads(ev.read_text())["item_answers"]) == 8


# ------------------------------------------------------------------------------------ onelayer ensemble


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A finished tiny sweep (base, full on seeds 0 and 1, layers 0-2 on seed 0; one step each, models
    saved), with a contribution profile written over its own (a random model gains nothing: NaN)."""
    out = tmp_path_factory.mktemp("ensemble") / "sweep"
    assert main(["sweep", "--out", str(out), "--single-layers", "0,1,2", *TINY]) == 0
    (out / "contributions.csv").write_text("condition,layer,relative_depth,contribution\n" + "".join(
        f"{CONDITION},{layer},{layer / 7},{c}\n" for layer, c in ((0, 0.4), (1, 0.5), (2, 0.3))))
    return out


def _copy(sweep, tmp_path):
    dest = tmp_path / "sweep"
    shutil.copytree(sweep, dest, ignore=shutil.ignore_patterns("checkpoint", "ensemble", "answers.json"))
    return dest


def _layer_job(sweep, layer):
    return next((sweep / "jobs").glob(f"*-L{layer}-s0-*"))


def _rows(out):
    return list(csv.DictReader((out / "ensemble.csv").open()))


def _set_answers(job, answers):
    """Give a layer job these greedy answers, scored as arith scores them."""
    ev = json.loads((job / "eval.json").read_text())
    items = {it["id"]: it for it in make("arith", n_eval=8).items("eval")}
    ev["item_answers"] = answers
    ev["item_scores"] = [float(a == items[i]["answer"]) for i, a in zip(ev["item_ids"], answers)]
    (job / "eval.json").write_text(json.dumps(ev))


def test_ensemble_votes_the_top_layers_and_compares_with_full_rl(tiny_sweep, tmp_path, capsys):
    sweep = _copy(tiny_sweep, tmp_path)
    t = [it["answer"] for it in make("arith", n_eval=8).items("eval")]
    # ranked 1, 0, 2 by the profile above; item by item: majority, majority, three-way tie (rank 1 wins), no
    # answer does not vote, tie, majority of wrong answers, nobody answers, tie
    _set_answers(_layer_job(sweep, 1), [t[0], t[1], "1", "", t[4], "1", "", "1"])
    _set_answers(_layer_job(sweep, 0), [t[0], t[1], "2", "", "2", "2", "", t[7]])
    _set_answers(_layer_job(sweep, 2), ["1", "2", t[2], t[3], "1", "2", "", "2"])
    out = tmp_path / "ens"
    assert main(["ensemble", "--from", str(sweep), "--top", "1,3", "--out", str(out)]) == 0
    rows = {(int(r["k"]), r["method"]): r for r in _rows(out)}
    score = lambda k, m: float(rows[(k, m)]["score"])  # noqa: E731
    assert score(3, "vote") == 4 / 8 and rows[(3, "vote")]["layers"] == "1,0,2"
    assert score(3, "oracle") == 6 / 8 and score(3, "best-single") == score(3, "layer-1") == 3 / 8
    assert score(1, "vote") == score(1, "layer-1") == 3 / 8
    full = [json.loads(p.read_text())["item_scores"] for p in sorted((sweep / "jobs").glob("*-all-s*/eval.json"))]
    assert score(3, "full") == pytest.approx(sum(map(sum, full)) / 16)
    assert {m for k, m in rows if k == 3} == {"vote", "full", "full-s0", "full-s1", "self-consistency",
                                              "self-consistency-s0", "self-consistency-s1", "best-single", "oracle",
                                              "layer-0", "layer-1", "layer-2"}
    for r in rows.values():
        assert float(r["ci_low"]) <= float(r["score"]) <= float(r["ci_high"])
        if r["method"] != "vote":
            assert float(r["delta_ci_low"]) <= float(r["vote_minus"]) <= float(r["delta_ci_high"])
            assert float(r["vote_minus"]) == pytest.approx(score(int(r["k"]), "vote") - float(r["score"]))
    record = json.loads((out / "ensemble.json").read_text())
    assert record["layer_seed"] == 0 and record["full_seeds"] == [0, 1] and record["per_k"]["3"]["no_answer_items"] == 1
    assert record["self_consistency"]["samples_drawn"] == 3 and record["self_consistency"]["temperature"] == 1.0
    assert all(r["answers_from"] == "eval.json" for r in record["ranking"])
    samples = json.loads(next((sweep / "jobs").glob("*-all-s0-*/answers.json")).read_text())["samples"]
    assert len(samples["item_answers"]) == 8 and {len(a) for a in samples["item_answers"]} == {3}
    # a second run reads the cached samples
    capsys.readouterr()
    assert main(["ensemble", "--from", str(sweep), "--top", "3", "--out", str(out)]) == 0
    assert "completions per item" not in capsys.readouterr().out


def test_answers_missing_from_an_old_eval_json_are_recomputed_from_the_model(tiny_sweep, tmp_path, capsys):
    sweep = _copy(tiny_sweep, tmp_path)
    job = _layer_job(sweep, 1)
    ev = json.loads((job / "eval.json").read_text())
    kept = ev.pop("item_answers")
    (job / "eval.json").write_text(json.dumps(ev))  # as a sweep run before answers were kept wrote it
    assert main(["ensemble", "--from", str(sweep), "--top", "1"]) == 0
    assert "recompute" in capsys.readouterr().out
    cache = json.loads((job / "answers.json").read_text())["greedy"]
    assert cache["item_answers"] == kept and cache["agreement"] == 1.0
    ranked = json.loads((sweep / "ensemble" / "ensemble.json").read_text())["ranking"][0]
    assert ranked["answers_from"] == "recomputed from model/" and ranked["agreement"] == 1.0
    assert main(["ensemble", "--from", str(sweep), "--top", "1"]) == 0  # now from answers.json
    assert "recompute its greedy answers" not in capsys.readouterr().out


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_ensemble_user_errors_are_one_line_and_exit_2(tiny_sweep, tmp_path, capsys):
    _one_line_error(capsys, ["ensemble", "--from", str(tmp_path)], "no contributions.csv")
    _one_line_error(capsys, ["ensemble", "--from", str(tiny_sweep), "--top", "4", "--out", str(tmp_path / "o")],
                    "--top 4 is more than the 3", "k <= 3")
    _one_line_error(capsys, ["ensemble", "--from", str(tiny_sweep), "--top", "0"], "positive integers")
    # --layer-seed chooses the voters' seed: the tiny sweep has single layers on its first seed only
    _one_line_error(capsys, ["ensemble", "--from", str(tiny_sweep), "--top", "1", "--layer-seed", "7",
                             "--out", str(tmp_path / "o")], "on seed 7", "--layer-seed")
    sweep = _copy(tiny_sweep, tmp_path)
    job = _layer_job(sweep, 1)
    ev = json.loads((job / "eval.json").read_text())
    del ev["item_answers"]
    (job / "eval.json").write_text(json.dumps(ev))
    shutil.rmtree(job / "model")
    _one_line_error(capsys, ["ensemble", "--from", str(sweep), "--top", "1"], job.name, "no model/", "save_model")


def test_agent_tasks_have_no_answers_to_vote_on(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    job = sweep / "jobs" / "grid-job"
    job.mkdir(parents=True)
    condition = "tiny-qwen3/grid/gigpo"
    (sweep / "contributions.csv").write_text(f"condition,layer,contribution\n{condition},0,0.5\n")
    (sweep / "plan.json").write_text(json.dumps({"spec": {"seeds": [0]}, "jobs": [
        {"id": "grid-job", "condition": condition, "layers": "0", "seed": 0}]}))
    (job / "status.json").write_text(json.dumps({"status": "done"}))
    (job / "eval.json").write_text(json.dumps({"layers": "0", "layer_indices": [0], "seed": 0, "item_scores": [1.0]}))
    (job / "config.json").write_text(json.dumps({"task": "grid", "task_opts": {"n_eval": 2}}))
    _one_line_error(capsys, ["ensemble", "--from", str(sweep), "--top", "1"], "agent task")
