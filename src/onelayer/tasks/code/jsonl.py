"""The ``code_jsonl`` task (alias ``mbpp``): code problems from MBPP- or HumanEval-format data files.

A local ``.jsonl`` / ``.json`` / ``.parquet`` file, read as in ``onelayer.tasks.mathdata`` (a path that
does not exist and does not look like a file is taken as a Hugging Face hub name, ``"name:split"``; a
single hub ``path`` is read from its ``train`` split and held out like a file), in one of two formats,
detected per file (every row of a file must have the first row's format):

* **MBPP**: ``text`` (or ``prompt``) describing the task, ``test_list`` (a list of ``assert``
  statements), optional ``code`` (a reference solution), ``test_setup_code`` and ``task_id``.
* **HumanEval**: ``prompt`` (the signature and docstring the completion continues), ``test`` (code
  that defines ``check(candidate)`` or asserts directly), ``entry_point`` (the function under test;
  may be null when the test calls it by name), optional ``canonical_solution`` and ``task_id``.

Splits work as in mathdata: ``train_path`` + ``eval_path``, or one ``path`` split by a hash of
``seed`` and the problem text (``eval_fraction`` of the rows go to eval); ``n_train`` / ``n_eval``
keep the first n items of a split.

Prompts. HumanEval-format items use the row's ``prompt`` unchanged; the completion continues the
function body. MBPP-format items get this prompt (``MBPP_TEMPLATE``; ``{tests}`` is ``test_list``
joined by newlines, ``{entry_point}`` the function the first test calls)::

    {description}
    Your code should pass these tests:
    {tests}
    Write the Python function `{entry_point}`.

followed by a newline; the completion is the whole function (with any imports it needs). The entry
point of an MBPP row is the first called name of its first ``assert`` that is not a builtin (one that
the reference ``code`` defines is preferred: ``assert set(f(x)) == ...`` gives ``f``). The test run
for an MBPP row is ``test_setup_code`` followed by the asserts, one per line.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterable, Sequence

from ..base import (
    TaskError,
    check_count,
    check_fraction,
    check_seed,
    check_sources,
    check_split,
    first_n,
    holdout,
    source_options,
)
from ..sources import read_source
from .base import CodeTask

MBPP_TEMPLATE = "{description}\nYour code should pass these tests:\n{tests}\nWrite the Python function `{entry_point}`.\n"
MBPP_TEMPLATE_NO_ENTRY = "{description}\nYour code should pass these tests:\n{tests}\nWrite the Python function.\n"
_BUILTIN_NAMES = frozenset(dir(builtins))


def mbpp_entry_point(tests: Sequence[str], defined: Iterable[str] = ()) -> str | None:
    """The function under test: the first non-builtin name called by the first assert that calls one.

    Calls are visited outermost first (``set(f(x)) == y`` visits ``set`` then ``f``). A name in
    ``defined`` (the functions the reference solution defines) is preferred. SyntaxError if a test
    does not parse.
    """
    defined = set(defined)
    for test in tests:
        names = []
        for node in ast.walk(ast.parse(test)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id not in _BUILTIN_NAMES and node.func.id not in names:
                    names.append(node.func.id)
        if names:
            preferred = [n for n in names if n in defined]
            return (preferred or names)[0]
    return None


def _top_level_functions(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def mbpp_prompt(description: str, tests: Sequence[str], entry_point: str | None) -> str:
    """The prompt of an MBPP-format row (``MBPP_TEMPLATE``)."""
    template = MBPP_TEMPLATE if entry_point else MBPP_TEMPLATE_NO_ENTRY
    return template.format(description=description.strip(), tests="\n".join(t.strip() for t in tests),
                           entry_point=entry_point)



class CodeJSONLTask(CodeTask):
    """Code problems from an MBPP- or HumanEval-format file (format detected per file; see module docstring)."""

    name = "code_jsonl"
    max_completion_length = 512

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        n_train: int | None = None,
        n_eval: int | None = None,
        seed: int = 0,
        subset: str | None = None,
        reward: str = "all",
        timeout_s: float = 5.0,
    ):
        super().__init__(reward, timeout_s)
        name = self.name
        check_sources(name, path, train_path, eval_path, " (MBPP or HumanEval format .jsonl)")
        self.options = {
            **source_options(path, train_path, eval_path),
            "eval_fraction": check_fraction(name, eval_fraction, allow_none=False),
            "n_train": check_count(name, "n_train", n_train),
            "n_eval": check_count(name, "n_eval", n_eval),
            "seed": check_seed(name, seed),
            "subset": subset,
            "reward": reward,
            "timeout_s": float(timeout_s),
        }
        o = self.options
        if path is not None:
            splits = holdout(self._read(o["path"], "train"), o["seed"], o["eval_fraction"], key=lambda it: it["_key"])
        else:
            splits = {"train": self._read(o["train_path"], "train"), "eval": self._read(o["eval_path"], "test")}
        for it in splits["train"] + splits["eval"]:
            del it["_key"]
        self._splits = first_n(splits, o["n_train"], o["n_eval"])

    def items(self, split: str) -> list[dict]:
        check_split(split)
        return [dict(it) for it in self._splits[split]]

    # -- loading ------------------------------------------------------------------------------
    def _read(self, source: str, default_split: str) -> list[dict]:
        tag, where, rows = read_source(source, self.name, self.options["subset"], default_split)
        if not rows:
            raise TaskError(f"{where}: no rows; each row is one problem in MBPP or HumanEval format")
        fmt = None
        items, seen = [], {}
        for loc, row in rows:
            if not isinstance(row, dict):
                raise TaskError(f"{where} {loc}: expected a JSON object (an MBPP or HumanEval problem), got {type(row).__name__}")
            if fmt is None:
                fmt = _detect_format(row, f"{where} {loc}")
            item = (_mbpp_item if fmt == "mbpp" else _humaneval_item)(row, f"{where} {loc}")
            tid = row.get("task_id")
            if tid is not None and not isinstance(tid, bool) and isinstance(tid, (str, int)):
                if tid in seen:
                    raise TaskError(f"{where} {loc}: task_id {tid!r} repeats {seen[tid]}; task ids must be unique")
                seen[tid] = loc
                item["id"] = f"{tag}:{tid}"
            else:
                item["id"] = f"{tag}:{loc.split()[-1]}"
            items.append(item)
        return items


def _detect_format(row: dict, where: str) -> str:
    if "test_list" in row:
        return "mbpp"
    if "test" in row or "entry_point" in row:
        return "humaneval"
    raise TaskError(
        f"{where}: cannot tell the row format; MBPP rows need 'text' (or 'prompt'), 'test_list' and usually "
        f"'code'; HumanEval rows need 'prompt', 'test' and 'entry_point' (fields found: {', '.join(sorted(row)) or 'none'})"
    )


def _need_str(row: dict, field: str, where: str, needs: str, optional: bool = False) -> str | None:
    value = row.get(field)
    if value is None:
        if optional:
            return None
        raise TaskError(f"{where}: missing field {field!r} ({needs})")
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _parse_check(code: str, field: str, where: str) -> None:
    try:
        ast.parse(code)
    except SyntaxError as e:
        raise TaskError(f"{where}: field {field!r} is not valid Python ({e.msg}, line {e.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise TaskError(f"{where}: field {field!r} is not valid Python ({type(e).__name__})") from None


_MBPP_NEEDS = ("MBPP-format rows (the format of the file's first row) need 'text' (or 'prompt') and 'test_list', "
               "optionally 'code', 'test_setup_code' and 'task_id'")
_HE_NEEDS = ("HumanEval-format rows (the format of the file's first row) need 'prompt', 'test' and 'entry_point', "
             "optionally 'canonical_solution' and 'task_id'")


def _mbpp_item(row: dict, where: str) -> dict:
    needs = _MBPP_NEEDS
    desc_field = "text" if row.get("text") is not None else "prompt"
    if row.get(desc_field) is None:
        raise TaskError(f"{where}: missing field 'text' (or 'prompt') ({needs})")
    description = _need_str(row, desc_field, where, needs)
    tests = row.get("test_list")
    if tests is None:
        raise TaskError(f"{where}: missing field 'test_list' ({needs})")
    if not isinstance(tests, (list, tuple)) or not tests:
        kind = "an empty list" if isinstance(tests, (list, tuple)) else type(tests).__name__
        raise TaskError(f"{where}: field 'test_list' must be a non-empty list of assert statements (strings), got {kind}")
    for j, t in enumerate(tests, 1):
        if not isinstance(t, str):
            raise TaskError(f"{where}: field 'test_list' item {j} must be a string, got {type(t).__name__}")
        _parse_check(t, f"test_list item {j}", where)
    tests = list(tests)
    code = _need_str(row, "code", where, needs, optional=True)
    setup = _need_str(row, "test_setup_code", where, needs, optional=True) or ""
    if setup.strip():
        _parse_check(setup, "test_setup_code", where)
    entry = mbpp_entry_point(tests, _top_level_functions(code or ""))
    test = (setup.rstrip("\n") + "\n" if setup.strip() else "") + "\n".join(tests) + "\n"
    item = {k: v for k, v in row.items() if k not in ("id", "prompt", "test", "entry_point", "solution", "format")}
    item.update(prompt=mbpp_prompt(description, tests, entry), test=test, entry_point=entry, solution=code,
                format="mbpp", _key=description)
    return item


def _humaneval_item(row: dict, where: str) -> dict:
    needs = _HE_NEEDS
    prompt = _need_str(row, "prompt", where, needs)
    test = _need_str(row, "test", where, needs)
    _parse_check(test, "test", where)
    if "entry_point" not in row:
        raise TaskError(f"{where}: missing field 'entry_point' ({needs}; use null when the test calls the function by name)")
    entry = row["entry_point"]
    if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
        raise TaskError(f"{where}: field 'entry_point' must be a function name (a string) or null, got {entry!r}")
    solution = _need_str(row, "canonical_solution", where, needs, optional=True)
    item = {k: v for k, v in row.items() if k not in ("id", "canonical_solution", "format")}
    item.update(prompt=prompt, test=test, entry_point=entry, solution=solution, format="humaneval", _key=prompt)
    return item
