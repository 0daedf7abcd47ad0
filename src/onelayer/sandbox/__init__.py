"""Run untrusted (model-written) Python programs against their tests, isolated from the host.

``check_program(program, test, entry_point)`` runs one program; ``check_programs(jobs)`` runs many, in
parallel across cores with a bound, several per sandbox start. Every model-written program in onelayer
goes through here and nowhere else.

Modules: ``isolation`` (the layers a sandbox start uses, and resource limits), ``verdict``
(``ExecResult`` and the assert sites it counts), ``run`` (``detect_isolation`` and the entry points),
``batch`` (one sandbox start) and ``runner`` (the script that runs inside the sandbox).
"""

from .batch import MAX_SLOTS, RUNNER_SOURCE, UID_BASE
from .isolation import NAMESPACE_FLAGS, Isolation, Limits
from .run import MAX_BATCH, check_program, check_programs, detect_isolation
from .verdict import STATUSES, ExecResult, instrument_test

__all__ = [
    "check_program",
    "check_programs",
    "detect_isolation",
    "ExecResult",
    "Isolation",
    "Limits",
    "instrument_test",
    "STATUSES",
    "NAMESPACE_FLAGS",
    "UID_BASE",
    "MAX_SLOTS",
    "MAX_BATCH",
    "RUNNER_SOURCE",
]
