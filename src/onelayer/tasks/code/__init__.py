"""Code-generation tasks scored by running tests in the sandbox: HumanEval, and MBPP- or
HumanEval-format data files.

Modules: ``base`` (``CodeTask``: programs, sandbox verdicts, rewards), ``extract`` (the program tested
for a completion), ``humaneval`` (the ``humaneval`` task) and ``jsonl`` (the ``code_jsonl`` task, alias
``mbpp``).

Items: ``id`` (HumanEval: the ``task_id``; files: ``"<file stem>:<task_id>"``, or the line number
when a row has no ``task_id``), ``prompt``, ``test``, ``entry_point``, ``solution`` (the reference
completion, the demonstration; None when the row has none), ``format`` (``"humaneval"`` or
``"mbpp"``) and, for files, the row's other fields.
"""

from .base import REWARDS, CodeTask
from .extract import (
    HUMANEVAL_STOP_SEQUENCES,
    build_program,
    defines_function,
    extract_code,
    fence_is_open,
    trim_to_parsable,
    truncate_continuation,
)
from .humaneval import HumanEvalTask
from .jsonl import MBPP_TEMPLATE, MBPP_TEMPLATE_NO_ENTRY, CodeJSONLTask, mbpp_entry_point, mbpp_prompt

__all__ = [
    "CodeTask",
    "HumanEvalTask",
    "CodeJSONLTask",
    "REWARDS",
    "HUMANEVAL_STOP_SEQUENCES",
    "MBPP_TEMPLATE",
    "MBPP_TEMPLATE_NO_ENTRY",
    "build_program",
    "defines_function",
    "extract_code",
    "fence_is_open",
    "trim_to_parsable",
    "truncate_continuation",
    "mbpp_entry_point",
    "mbpp_prompt",
]
