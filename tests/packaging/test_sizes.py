"""Every module of ``surgery`` stays small enough to read in one sitting: under ~600 lines, and
no function over ~80 (measured from ``def`` to its last line, docstring included), read with
``ast`` from the source tree.

The checker itself is tried on generated sources first: a check that cannot fail is none.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "surgery"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def oversized(source: str, name: str) -> list[str]:
    """What in ``source`` (the text of module ``name``) is over the limits, one line each."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines (limit {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}():\n{body}"


def test_the_checker_finds_what_is_too_long():
    assert oversized(_function("ok", MAX_FUNCTION_LINES - 1), "m.py") == []
    assert oversized(_function("long", MAX_FUNCTION_LINES), "m.py") == [
        f"m.py:1 long(): {MAX_FUNCTION_LINES + 1} lines"
    ]
    method = "class C:\n" + _function("method", MAX_FUNCTION_LINES, indent="    ")
    assert [f.split(" ", 1)[1] for f in oversized(method, "m.py")] == [
        f"method(): {MAX_FUNCTION_LINES + 1} lines"
    ]
    module = "x = 1\n" * (MAX_MODULE_LINES + 1)
    assert oversized(module, "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines (limit 600)"]


def test_no_module_or_function_of_surgery_is_oversized():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"expected the package's modules under {PACKAGE}"
    found = [
        problem
        for path in files
        for problem in oversized(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not found, "split these:\n" + "\n".join(found)
