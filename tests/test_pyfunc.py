"""The synthetic code task ``pyfunc``: problem generation, splits, sandboxed scoring, and its CLI paths."""

import json

import pytest

from onelayer import tasks
from onelayer.cli import main
from onelayer.tasks.pyfunc import LEVELS, PyFuncTask, _apply, _expr, _functions, is_eval_problem


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_items_deterministic_disjoint_and_well_posed(difficulty):
    task = PyFuncTask(difficulty=difficulty, n_train=300, n_eval=100)
    train, ev = task.items("train"), task.items("eval")
    assert len(train) == 300 and len(ev) == 100
    assert train == PyFuncTask(difficulty=difficulty, n_train=300, n_eval=100).items("train")
    assert not {it["id"] for it in train} & {it["id"] for it in ev}
    assert all(is_eval_problem(it["id"]) for it in ev) and not any(is_eval_problem(it["id"]) for it in train)
    funcs = _functions(difficulty)
    for it in ev[:30]:
        shown = [tuple(pair.split(">")) for pair in it["prompt"][:-1].split(" ")]
        xs = [eval(x) for x, _ in shown]
        ys = [eval(y) for _, y in shown]
        fitting = [f for f in funcs if _fits(f, xs, ys)]
        assert {_expr(*f) for f in fitting} == {it["solution"]}, (it["prompt"], fitting)
        assert it["test"].count("assert") == 6 and it["prompt"].endswith(":")


def _fits(func, xs, ys):
    try:
        return all(_apply(*func, x) == y for x, y in zip(xs, ys))
    except (TypeError, AttributeError):  # an int function on a string input, or the other way round
        return False


def test_solutions_pass_and_wrong_ones_fail_in_the_sandbox():
    task = PyFuncTask(difficulty=3, n_train=0, n_eval=60)
    ev = task.items("eval")
    assert task.score_batch(ev, [it["solution"] for it in ev]) == [1.0] * 60
    assert task.score_batch(ev[:5], ["0"] * 5) == [0.0] * 5
    hostile = "__import__('os').system('touch /tmp/pyfunc_pwned') or x"
    add = next(it for it in ev if it["function"] == "add")
    assert task.score(add, hostile) == 0.0
    assert task.score(add, "x+(") == 0.0


def test_fraction_reward_gives_partial_credit():
    task = PyFuncTask(difficulty=1, n_train=0, n_eval=50, reward="fraction")
    item = next(it for it in task.items("eval") if it["function"] == "mul")
    k = int(item["solution"].split("*")[1])
    partial = task.score(item, f"x*{k} if x<5 else -1")
    assert 0.0 < partial < 1.0
    assert PyFuncTask(difficulty=1, n_train=0, n_eval=50).score(item, f"x*{k} if x<5 else -1") == 0.0


@pytest.mark.parametrize("opts, needle", [
    ({"difficulty": 9}, "difficulty=9"), ({"reward": "most"}, "reward='most'"), ({"n_eval": -1}, "n_eval=-1"),
    ({"timeout_s": 0}, "timeout_s=0"),
])
def test_bad_options(opts, needle):
    with pytest.raises(tasks.TaskError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        tasks.make("pyfunc", **opts)


@pytest.mark.slow
def test_train_and_eval_commands_run_on_pyfunc(tmp_path, onelayer_cache):
    """The code task goes through the same train / eval paths as any task (no warm start: a few steps)."""
    out = tmp_path / "run"
    common = ["--task", "pyfunc", "--task-opt", "n_eval=40", "--no-warm-start", "--no-progress"]
    assert main(["train", "--out", str(out), *common, "--layers", "middle:1", "--max-steps", "2",
                 "--prompts-per-step", "4", "--num-generations", "4"]) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["task"] == "pyfunc" and rec["n"] == 40 and rec["frozen_unchanged"]
    assert main(["eval", "--model", str(out / "model"), *common[:4], "--samples", "3", "--pass-k", "1,2,5",
                 "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert set(ev["pass_at_k"]) == {"1", "2"} and len(ev["item_pass_counts"]) == 40
    assert all(0 <= c <= 3 for c in ev["item_pass_counts"])
