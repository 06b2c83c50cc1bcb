"""No function in megatron_oapl/ or launch/ is longer than 80 lines, docstring aside (issue #23, item 4): a
longer one is split into named pieces a reader can follow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 80


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the last one (nested functions
    count towards the function that holds them)."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def long_functions(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {body_lines(node)} lines"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_LINES]


def test_body_lines_leave_the_docstring_out():
    fn = ast.parse('def f():\n    """Doc\n    on two lines."""\n    a = 1\n    return a\n').body[0]
    assert body_lines(fn) == 2


def test_no_function_is_over_80_lines():
    files = sorted([*(ROOT / "megatron_oapl").rglob("*.py"), *(ROOT / "launch").rglob("*.py")])
    assert len(files) > 50
    found = [hit for path in files for hit in long_functions(path)]
    assert found == [], "split these into named pieces:\n" + "\n".join(found)
