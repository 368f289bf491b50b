"""Every module of ``surgery`` stays small enough to read in one sitting: under ~600 lines, and
no function over ~80 (measured from ``def`` to its last line, docstring included), read with
``ast`` from the source tree. No function imports a module of ``surgery`` (an import inside a
function is how a cycle between layers hides; optional third-party packages may be imported
late).

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


def imports_inside_functions(source: str, name: str) -> list[str]:
    """The imports of ``surgery``'s own modules that ``source`` makes inside a function."""
    found = []
    for fn in ast.walk(ast.parse(source, name)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            own = (isinstance(node, ast.ImportFrom) and node.level > 0) or (
                isinstance(node, ast.Import | ast.ImportFrom)
                and any(
                    n.split(".")[0] == "surgery"
                    for n in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    + [a.name for a in node.names]
                )
            )
            if own:
                found.append(f"{name}:{node.lineno} in {fn.name}(): {ast.unparse(node)}")
    return found


def test_the_import_checker_finds_a_late_import():
    late = "import timm\n\ndef f():\n    import torchvision\n    from .plan import x\n"
    assert imports_inside_functions(late, "m.py") == ["m.py:5 in f(): from .plan import x"]
    assert imports_inside_functions("def f():\n    import surgery.load\n", "m.py") == [
        "m.py:2 in f(): import surgery.load"
    ]


def test_no_function_of_surgery_imports_surgery():
    found = [
        problem
        for path in sorted(PACKAGE.rglob("*.py"))
        for problem in imports_inside_functions(
            path.read_text(), str(path.relative_to(PACKAGE.parent))
        )
    ]
    assert not found, "import these at the top of the module (or fix the layering):\n" + "\n".join(
        found
    )
