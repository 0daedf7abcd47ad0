"""What a sandbox run returns, and how a test's asserts become the sites it counts.

The verdict comes from the harness process, which never runs program code (see ``runner``): the test
code runs there and calls the program's functions through proxies that pass plain data only. Each
``assert`` of the test is a *site* (``instrument_test`` numbers them); ``passed`` / ``total`` count the
sites that ran and never failed, and the status is ``passed`` only when every site ran and held and no
exception escaped the tests. A run also echoes a per-run random nonce, which the caller checks, so a
verdict line cannot come from anywhere but this run's harness.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error")


@dataclass
class ExecResult:
    """The verdict on one program: ``status`` is one of passed, failed, timeout, error.

    ``error`` is a load error, a failed assertion or the reason for the status; ``passed`` / ``total``
    count assertion sites (``total`` is 0 when the test has no ``assert``).
    """

    status: str
    passed: int = 0
    total: int = 0
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        """Share of assertion sites that passed (1.0 / 0.0 by status when there are none)."""
        if self.total:
            return self.passed / self.total
        return 1.0 if self.ok else 0.0


class _Sites(ast.NodeTransformer):
    """Rewrite ``assert test, msg`` into ``__ol_assert__(i, lambda: test, lambda: msg)``."""

    def __init__(self):
        self.n = 0

    def visit_Assert(self, node: ast.Assert):
        i, self.n = self.n, self.n + 1
        no_args = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
        args = [ast.Constant(i), ast.Lambda(args=no_args, body=node.test)]
        if node.msg is not None:
            args.append(ast.Lambda(args=no_args, body=node.msg))
        call = ast.Call(func=ast.Name("__ol_assert__", ast.Load()), args=args, keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def instrument_test(test: str) -> tuple[str, int]:
    """The test source with every ``assert`` routed through the harness, and the number of sites.

    Raises SyntaxError when ``test`` does not parse.
    """
    tree = ast.parse(test)
    sites = _Sites()
    tree = ast.fix_missing_locations(sites.visit(tree))
    return ast.unparse(tree), sites.n
