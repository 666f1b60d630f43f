"""Rules the test suite keeps (issue 24): every test function checks something, by an ``assert`` or
``pytest.raises`` of its own or through a helper of the tests that does; a test that checks nothing cannot fail.

Read from the test files' syntax trees (not by running them): a helper counts when it is a function defined in
``tests/`` whose body asserts, raises ``AssertionError`` or calls another such helper.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Calls that check by themselves: pytest's context managers and failing calls (and numpy.testing's assert_*).
CHECKING_CALLS = {"raises", "warns", "fail", "approx"}


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute):
                names.add(func.attr)
    return names


def _checks_directly(node: ast.AST) -> bool:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Assert):
            return True
        if isinstance(inner, ast.Raise) and inner.exc is not None and "AssertionError" in ast.unparse(inner.exc):
            return True
    called = _called_names(node)
    return bool(called & CHECKING_CALLS) or any(name.startswith("assert_") for name in called)  # numpy.testing


def _functions() -> dict[Path, list[ast.FunctionDef]]:
    found: dict[Path, list[ast.FunctionDef]] = {}
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found[path] = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def checking_helpers(functions: dict[Path, list[ast.FunctionDef]]) -> set[str]:
    """Names of functions (and methods) in tests/ that check, directly or through one another."""
    every = [f for fs in functions.values() for f in fs]
    checking = {f.name for f in every if _checks_directly(f)}
    while True:  # the closure: a function calling a checking helper checks too
        more = {f.name for f in every if f.name not in checking and _called_names(f) & checking}
        if not more:
            return checking
        checking |= more


def test_every_test_function_checks_something() -> None:
    functions = _functions()
    helpers = checking_helpers(functions)
    unchecked = [
        f"{path.name}::{f.name}"
        for path, fs in functions.items() if path.name.startswith("test_")
        for f in fs if f.name.startswith("test_") and not (_checks_directly(f) or _called_names(f) & helpers)
    ]
    assert unchecked == []


def test_the_rule_tells_a_test_that_checks_nothing() -> None:
    """The check itself can fail: a test that only calls something is caught."""
    source = "def helper():\n    assert True\n\ndef test_a():\n    helper()\n\ndef test_b():\n    print(1)\n"
    tree = ast.parse(source)
    functions = {TESTS / "test_example.py": [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]}
    helpers = checking_helpers(functions)
    assert [f.name for f in functions[TESTS / "test_example.py"]
            if f.name.startswith("test_") and not (_checks_directly(f) or _called_names(f) & helpers)] == ["test_b"]
