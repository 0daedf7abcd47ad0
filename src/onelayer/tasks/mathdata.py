"""Math word-problem tasks from data files: GSM8K format and MATH format, scored with math-verify.

Formats (one row per problem):

- **gsm8k**: ``question`` and ``answer``; the answer is a worked solution ending in ``#### <final>``
  (``"... so she pays 1,200 dollars.\\n#### 1,200"``). Commas in the final number are dropped.
- **math**: ``problem`` and ``solution``; the final answer is the last ``\\boxed{...}`` of the
  solution, or the row's ``answer`` field when there is one (as in MATH-500).

Sources: a local ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects) or ``.parquet``
file (needs pyarrow), or — when the path does not exist locally and does not look like a file name —
a Hugging Face ``datasets`` hub name, optionally with a split: ``"openai/gsm8k"``,
``"HuggingFaceH4/MATH-500:test"`` (``datasets`` is imported only then), read by
``onelayer.tasks.sources``.

Splits: pass ``train_path`` and ``eval_path``, or a single ``path``. A single local file is split by a
deterministic holdout: a row goes to eval when a hash of ``seed`` and its question text falls below
``eval_fraction`` (duplicated questions land in the same split). A single hub name uses its ``train``
and ``test`` splits (holdout of ``train`` if it has no ``test``). ``n_train`` / ``n_eval`` keep the
first n rows of a split (file order).

Prompts are short on purpose (tiny models): ``"{question}\\nAnswer:"`` for gsm8k and
``"{problem}\\nAnswer:"`` for math; ``prompt_template`` may name any field of the row.

Scoring: the gold answer and the completion are parsed with ``math_verify.parse`` and compared with
``math_verify.verify`` → 1.0 or 0.0. A completion that is a bare expression (no ``$`` delimiters and
no words, like ``2\\sqrt{3}`` or ``-3, 3`` as a tiny model writes it) is parsed as LaTeX. math-verify's
timeouts use ``signal.alarm``, which only works in the main thread: there they are kept; elsewhere
(worker threads) they are switched off and the completion is truncated to its last
``MAX_PARSE_CHARS`` characters to bound the work instead.

Demonstrations are the final answer only (``" 1200"``, ``" \\frac{1}{2}"``; a space is put in front
when the prompt does not end in whitespace) — tiny models learn the answer format, not the reasoning.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from .base import (
    Task,
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
from .sources import looks_like_file, read_source, split_hub_name

MAX_PARSE_CHARS = 2000  # bound on what is parsed without a timeout (worker threads)
PARSE_TIMEOUT_S = 5  # math-verify timeouts, main thread only (signal.alarm takes whole seconds)
_LATEX_DELIMS = ("$", "\\(", "\\[", "\\boxed")


# ---------------------------------------------------------------------------------------------
# final answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``, or None."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    i = starts[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": the answer runs to the next space or dollar
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced braces


def gsm8k_final(answer: str) -> str | None:
    """The final number after ``####`` in a GSM8K answer, commas and spaces removed; None if absent."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "").replace(" ", "")
    return final.rstrip(".") or None


# ---------------------------------------------------------------------------------------------
# math-verify, usable from any thread


class _DropTimeoutDisabledWarning(logging.Filter):
    # Timeouts are switched off on purpose in worker threads (see module docstring).
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_mv_lock = threading.Lock()
_mv = None


def _math_verify():
    global _mv
    with _mv_lock:
        if _mv is None:
            import math_verify

            for logger_name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(logger_name).addFilter(_DropTimeoutDisabledWarning())
            _mv = math_verify
    return _mv


def _timeout() -> int | None:
    return PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _bare_math(text: str) -> bool:
    """Whether ``text`` is an expression without math delimiters (no words outside LaTeX commands)."""
    if any(d in text for d in _LATEX_DELIMS):
        return False
    stripped = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}", "", text)
    stripped = re.sub(r"\\[A-Za-z]+", "", stripped)
    return re.search(r"[A-Za-z]{2,}", stripped) is None


def mv_parse(text: str, latex: bool = False) -> list:
    """``math_verify.parse`` that works in any thread; ``latex=True`` wraps bare text in ``$…$``."""
    mv = _math_verify()
    t = _timeout()
    text = text.strip()
    if t is None:
        text = text[-MAX_PARSE_CHARS:]
    if latex or _bare_math(text):
        # bare LaTeX such as "2\sqrt{3}" or "-3, 3" is otherwise read as the plain number 2 / 3
        parsed = mv.parse(f"${text}$", parsing_timeout=t)
        if parsed:
            return parsed
    return mv.parse(text, parsing_timeout=t)


def parsed_answer(parsed: list) -> str:
    """A canonical string of a ``mv_parse`` result: the text math-verify extracted and parsed (its last
    string element, which determines the parsed expression), "" when nothing parsed."""
    if not parsed:
        return ""
    return next((x for x in reversed(parsed) if isinstance(x, str)), str(parsed[-1]))


def mv_verify(gold: list, pred: list) -> bool:
    """``math_verify.verify`` that works in any thread."""
    if not gold or not pred:
        return False
    return bool(_math_verify().verify(gold, pred, timeout_seconds=_timeout()))


# ---------------------------------------------------------------------------------------------
# tasks


class MathDataTask(Task):
    """Shared loader and scorer for GSM8K- and MATH-format data (use GSM8KTask / MATHTask)."""

    question_field = ""  # the field that identifies a problem (holdout hash)
    required: tuple[str, ...] = ()
    default_template = ""
    gold_is_latex = False  # parse the gold answer as LaTeX even without delimiters

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        n_train: int | None = None,
        n_eval: int | None = None,
        prompt_template: str | None = None,
        seed: int = 0,
        subset: str | None = None,
    ):
        name = self.name
        check_sources(name, path, train_path, eval_path)
        template = self.default_template if prompt_template is None else prompt_template
        if not isinstance(template, str):
            raise TaskError(f"{name}: prompt_template must be a string like {self.default_template!r}")
        self.template = template
        self.options = {
            **source_options(path, train_path, eval_path),
            "eval_fraction": check_fraction(name, eval_fraction),
            "n_train": check_count(name, "n_train", n_train),
            "n_eval": check_count(name, "n_eval", n_eval),
            "prompt_template": template,
            "seed": check_seed(name, seed),
            "subset": subset,
        }
        self._subset = subset
        self._splits = self._load()
        self._gold_cache: dict[str, list] = {}

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> dict[str, list[dict]]:
        o = self.options
        if o["path"] is not None:
            source = o["path"]
            local = Path(source).expanduser().exists() or looks_like_file(source)
            hub_name, hub_split = (None, None) if local else split_hub_name(source)
            if hub_name is not None and hub_split is None:
                train = self._items(*read_source(f"{hub_name}:train", self.name, self._subset, "train"))
                try:
                    test = read_source(f"{hub_name}:test", self.name, self._subset, "test")
                except TaskError:  # no test split: hold out part of train
                    splits = self._holdout(train)
                else:
                    splits = {"train": train, "eval": self._items(*test)}
            else:
                splits = self._holdout(self._items(*read_source(source, self.name, self._subset, "train")))
        else:
            splits = {
                "train": self._items(*read_source(o["train_path"], self.name, self._subset, "train")),
                "eval": self._items(*read_source(o["eval_path"], self.name, self._subset, "test")),
            }
        return first_n(splits, o["n_train"], o["n_eval"])

    def _holdout(self, items: list[dict]) -> dict[str, list[dict]]:
        return holdout(items, self.options["seed"], self.options["eval_fraction"], key=lambda it: it[self.question_field])

    def _items(self, tag: str, where: str, rows: list[tuple[str, dict]]) -> list[dict]:
        items = []
        for loc, row in rows:
            if not isinstance(row, dict):
                raise TaskError(f"{where} {loc}: expected a JSON object with fields {self._fields_text()}, "
                                f"got {type(row).__name__}")
            for field in self.required:
                if field not in row or row[field] is None:
                    raise TaskError(f"{where} {loc}: missing field {field!r} (each row needs {self._fields_text()})")
                if not isinstance(row[field], str):
                    raise TaskError(f"{where} {loc}: field {field!r} must be a string, got {type(row[field]).__name__}")
            final = self._final_answer(row, f"{where} {loc}")
            try:
                prompt = self.template.format(**row)
            except KeyError as e:
                raise TaskError(
                    f"{self.name}: prompt_template {self.template!r} names field {e.args[0]!r}, which {where} {loc} "
                    f"lacks; available fields: {', '.join(sorted(row))} (write {{{{ and }}}} for literal braces)"
                ) from None
            except (IndexError, ValueError) as e:
                raise TaskError(f"{self.name}: bad prompt_template {self.template!r} ({e}); "
                                f"use named fields like {{{self.question_field}}}") from None
            item = {k: v for k, v in row.items() if k not in ("id", "prompt")}
            item.update(id=f"{tag}:{loc.split()[-1]}", prompt=prompt, final_answer=final)
            items.append(item)
        return items

    def _fields_text(self) -> str:
        return " and ".join(repr(f) for f in self.required)

    def _final_answer(self, row: dict, where: str) -> str:
        raise NotImplementedError

    # -- Task API -----------------------------------------------------------------------------
    def items(self, split: str) -> list[dict]:
        check_split(split)
        return [dict(it) for it in self._splits[split]]

    def _gold(self, item: dict) -> list:
        final = item["final_answer"]
        gold = self._gold_cache.get(final)
        if gold is None:
            gold = mv_parse(final, latex=self.gold_is_latex)
            self._gold_cache[final] = gold
        return gold

    def answer(self, item: dict, completion: str) -> str:
        """The answer math-verify extracts from the completion (the string it parsed), "" when none parses."""
        return parsed_answer(mv_parse(completion))

    def score(self, item: dict, completion: str) -> float:
        return 1.0 if mv_verify(self._gold(item), mv_parse(completion)) else 0.0

    def demonstration(self, item: dict) -> str:
        prompt = item.get("prompt", "")
        sep = "" if not prompt or prompt[-1].isspace() else " "
        return sep + item["final_answer"]


class GSM8KTask(MathDataTask):
    """GSM8K-format word problems: rows with ``question`` and ``answer`` ending in ``#### <number>``."""

    name = "gsm8k"
    question_field = "question"
    required = ("question", "answer")
    default_template = "{question}\nAnswer:"

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        n_train: int | None = None,
        n_eval: int | None = None,
        prompt_template: str = "{question}\nAnswer:",
        seed: int = 0,
        subset: str | None = None,
    ):
        if subset is None and path is not None and not Path(path).expanduser().exists() and "gsm8k" in path.lower():
            subset = "main"  # the hub GSM8K needs a config name
        super().__init__(path, train_path, eval_path, eval_fraction, n_train, n_eval, prompt_template, seed, subset)

    def _final_answer(self, row: dict, where: str) -> str:
        final = gsm8k_final(row["answer"])
        if final is None:
            raise TaskError(f"{where}: field 'answer' has no '#### <final answer>' line (GSM8K answers end with e.g. '#### 42')")
        return final


class MATHTask(MathDataTask):
    """MATH-format problems: rows with ``problem`` and ``solution`` (last ``\\boxed{}``), or an ``answer`` field."""

    name = "math"
    question_field = "problem"
    required = ("problem",)
    default_template = "{problem}\nAnswer:"
    gold_is_latex = True

    def _final_answer(self, row: dict, where: str) -> str:
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, bool) and str(answer).strip():
            return str(answer).strip()
        solution = row.get("solution")
        if solution is None:
            raise TaskError(f"{where}: missing field 'solution' (each row needs 'problem' and 'solution' "
                            f"with a \\boxed{{}} answer, or an 'answer' field)")
        if not isinstance(solution, str):
            raise TaskError(f"{where}: field 'solution' must be a string, got {type(solution).__name__}")
        boxed = last_boxed(solution)
        if not boxed:
            raise TaskError(f"{where}: field 'solution' has no \\boxed{{...}} final answer "
                            f"(add one, or give the row an 'answer' field)")
        return boxed
