"""Jobs are thin drivers (issue 32 item 4): no jobs/*.py holds more than 120 lines of its own
logic; the rest lives in the package, where tests reach it.

"Own logic" is measured with ``ast``: the lines of the script's statements, leaving out the
module docstring and every function's or class's docstring, imports, argument parsing
(``argparse.ArgumentParser(...)``, ``add_argument`` and the other parser calls, each a whole
statement), printing (``print``, ``log``, ``logging``/logger calls as statements) and the
``if __name__ == "__main__"`` guard with its body. A compound statement (``def``, ``if``,
``for``, ...) counts its header lines and whatever its body counts; comments and blank lines
between statements are not statements.
"""

from __future__ import annotations

import ast
from pathlib import Path

from d4a_batch.schema import REPO_ROOT

LIMIT = 120
PARSER_CALLS = {
    "ArgumentParser", "add_argument", "add_argument_group", "add_mutually_exclusive_group",
    "add_subparsers", "add_parser", "set_defaults", "parse_args", "parse_known_args",
}  # fmt: skip
PRINT_NAMES = {"print", "log"}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
LOGGERS = {"log", "logger", "logging", "LOG", "LOGGER"}


def _call_name(node: ast.AST) -> tuple[str, str]:
    """(owner, name) of a call's function: ``p.add_argument`` -> ("p", "add_argument")."""
    if not isinstance(node, ast.Call):
        return "", ""
    f = node.func
    if isinstance(f, ast.Name):
        return "", f.id
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else ""
        return owner, f.attr
    return "", ""


def _is_parsing_or_printing(stmt: ast.stmt) -> bool:
    value = getattr(stmt, "value", None)
    if not isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign, ast.Return)):
        return False
    owner, name = _call_name(value)
    if name in PARSER_CALLS:
        return True
    if not isinstance(stmt, ast.Expr):
        return False
    return (not owner and name in PRINT_NAMES) or (owner in LOGGERS and name in LOG_METHODS)


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and isinstance(stmt.test, ast.Compare)
        and isinstance(stmt.test.left, ast.Name)
        and stmt.test.left.id == "__name__"
    )


def _lines(body: list[ast.stmt], out: set[int], top: bool = False) -> None:
    for i, stmt in enumerate(body):
        if i == 0 and _is_docstring(stmt):
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or _is_parsing_or_printing(stmt):
            continue
        if top and _is_main_guard(stmt):
            continue
        blocks = [
            b
            for name in ("body", "orelse", "finalbody", "handlers", "cases")
            for b in [getattr(stmt, name, None)]
            if isinstance(b, list) and b
        ]
        if not blocks:
            out.update(range(stmt.lineno, stmt.end_lineno + 1))
            continue
        first = min(b[0].lineno for b in blocks)
        out.update(range(stmt.lineno, max(stmt.lineno, first - 1) + 1))  # the header
        for b in blocks:
            if isinstance(b[0], ast.ExceptHandler) or type(b[0]).__name__ == "match_case":
                for h in b:
                    out.add(h.lineno)
                    _lines(h.body, out)
            else:
                _lines(b, out)


def own_logic_lines(source: str) -> int:
    """The script's own-logic line count (see the module docstring)."""
    out: set[int] = set()
    _lines(ast.parse(source).body, out, top=True)
    return len(out)


def test_the_measure_leaves_out_parsing_printing_imports_and_docstrings():
    source = '''"""Doc."""
import json
from pathlib import Path


def parse(argv):
    """Doc."""
    p = argparse.ArgumentParser(description="x")
    p.add_argument("--n", type=int,
                   default=1)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    print("hello",
          args.n)
    log.info("x")
    for i in range(args.n):
        total = (i
                 + 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''
    # def parse, def main, args = ..., for ..., total = ... (2 lines), return 0
    assert own_logic_lines(source) == 7


def test_no_job_has_more_than_120_lines_of_its_own_logic():
    """The last four over the limit (benchmark_throughput 230, benchmark_planning 188,
    choose_field 161, evaluate_prior 145) moved their logic into validation.throughput_sections
    and engine_throughput, validation.planning, validation.field_choice and
    training.prior_comparison."""
    jobs = sorted((REPO_ROOT / "jobs").glob("*.py"))
    assert len(jobs) >= 19
    counts = {p.name: own_logic_lines(p.read_text()) for p in jobs}
    over = {name: n for name, n in counts.items() if n > LIMIT}
    assert not over, f"jobs over {LIMIT} lines of their own logic: {over}"


if __name__ == "__main__":  # the counts, for the report
    for path in sorted(Path(REPO_ROOT / "jobs").glob("*.py")):
        print(f"{own_logic_lines(path.read_text()):5d}  {path.name}")
