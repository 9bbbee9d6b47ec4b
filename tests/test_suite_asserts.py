"""No test case passes without asserting: every test function in tests/ checks something.

A test function counts as checking when its body (read with ``ast``, nothing is run) holds an
``assert`` of a non-constant, a ``pytest.raises``/``warns``/``fail``, a call to a function whose
name starts with ``assert``/``check``/``expect`` (``np.testing.assert_allclose``, a module's
``_check``), or a call to a function of the same module that does (transitively). Static, so it
cannot see an assert skipped by a branch; it catches the test that can pass having checked nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
_CHECKING_CALLS = {"raises", "warns", "deprecated_call", "fail"}
_CHECKING_PREFIXES = ("assert", "check", "expect")


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Module:
    def __init__(self, tree: ast.Module):
        self.functions: dict[str, ast.AST] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)
        self._memo: dict[str, bool] = {}

    def checks(self, node: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Assert) and not isinstance(inner.test, ast.Constant):
                return True
            if not isinstance(inner, ast.Call):
                continue
            name = _called_name(inner)
            if name in self.functions and name not in seen:
                if self._helper_checks(name, seen):
                    return True
            elif name in _CHECKING_CALLS or name.lstrip("_").startswith(_CHECKING_PREFIXES):
                return True
        return False

    def _helper_checks(self, name: str, seen: frozenset[str]) -> bool:
        if name not in self._memo:
            self._memo[name] = self.checks(self.functions[name], seen | {name})
        return self._memo[name]


def unchecked_tests(source: str) -> list[str]:
    """Names of the test functions in ``source`` that can pass without checking anything."""
    tree = ast.parse(source)
    module = _Module(tree)
    tests = [node for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")]
    return [node.name for node in tests if not module.checks(node, frozenset({node.name}))]


def test_every_test_in_the_suite_asserts_something():
    files = sorted(TESTS.rglob("test_*.py"))
    assert len(files) > 40  # the scan really reads the suite
    missing = [f"{path.relative_to(TESTS)}::{name}" for path in files
               for name in unchecked_tests(path.read_text(encoding="utf-8"))]
    assert missing == [], "test functions that check nothing: " + ", ".join(missing)


@pytest.mark.parametrize("body, checks", [
    ("    run()\n", False),
    ("    assert True\n", False),
    ("    if flag:\n        return\n    helper_that_only_runs()\n", False),
    ("    assert run() == 3\n", True),
    ("    with pytest.raises(ValueError):\n        run()\n", True),
    ("    np.testing.assert_allclose(run(), 1)\n", True),
    ("    _check(run())\n", True),
    ("    _verify(run())\n", True),   # _verify asserts, two calls deep
    ("    _quiet(run())\n", False),   # _quiet does not
])
def test_the_scan_tells_a_checking_test_from_one_that_checks_nothing(body, checks):
    source = ("def _verify(x):\n    _inner(x)\n\ndef _inner(x):\n    assert x\n\n"
              "def _quiet(x):\n    print(x)\n\n"
              f"def test_planted():\n{body}")
    assert unchecked_tests(source) == ([] if checks else ["test_planted"])
