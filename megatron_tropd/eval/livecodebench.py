"""LiveCodeBench's grading rules for code items (``lcb_runner/evaluation/testing_util.py``).

Programs run in the sandbox (:mod:`megatron_tropd.eval.sandbox`), one process per test, prepared the way
LiveCodeBench prepares them:

- every program starts with LCB's preloaded imports (star imports of ``string``, ``re``, ``datetime``,
  ``collections``, ``heapq``, ``bisect``, ``copy``, ``math``, ``random``, ``statistics``, ``itertools``,
  ``functools``, ``operator``, ``io``, ``sys``, ``json``, ``builtins``, ``typing``, then the modules
  themselves) and its recursion limit of 50000; ``__name__`` is not ``"__main__"`` (LCB executes the code
  as a module), except that a final ``if __name__ == '__main__':`` block is unwrapped as LCB does;
- stdin programs: the imports stay at module level and every other statement becomes the body of one
  function that is then called (so a ``global`` naming a top-level variable fails as it does in LCB); a
  ``SystemExit`` ends the program and its output so far is graded;
- call-based (LeetCode-style) items: each input line is one JSON argument; the function is
  ``Solution().<entry>`` when the code contains ``class Solution``, else the top-level ``<entry>``; a tuple
  result counts as a list and the result must equal the JSON output under Python's ``==``.

Stdout is compared line by line: both texts are stripped, split on ``\\n`` and each line stripped; the
line counts must agree, and each pair of lines must be equal or else both be whitespace-separated numbers
with equal :class:`decimal.Decimal` values (``3.0`` equals ``3``; ``3.0000001`` does not: no tolerance).

Not imitated: LCB's mocked stdin (its ``readline`` drops the newline and it cannot be iterated); input
arrives on a real stdin, and each test runs in a fresh process (LCB reuses one ``Solution`` instance).
"""

from __future__ import annotations

import ast
import json
import secrets
from decimal import Decimal, InvalidOperation

RECURSION_LIMIT = 50_000
_STAR_IMPORTS = (
    "string",
    "re",
    "datetime",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "math",
    "random",
    "statistics",
    "itertools",
    "functools",
    "operator",
    "io",
    "sys",
    "json",
    "builtins",
    "typing",
)
_MODULE_IMPORTS = _STAR_IMPORTS[:-2]  # builtins and typing are only star-imported
PRELUDE = (
    "".join(f"from {name} import *\n" for name in _STAR_IMPORTS)
    + "".join(f"import {name}\n" for name in _MODULE_IMPORTS)
    + f"sys.setrecursionlimit({RECURSION_LIMIT})\n__name__ = '_lcb_solution'\n"
)
_MAIN = "_lcb_main"


def _unwrap_main_guard(tree: ast.Module) -> None:
    """A final ``if __name__ == '__main__':`` (spelt exactly so) is replaced by its body."""
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.If) and ast.unparse(last.test).strip() == "__name__ == '__main__'":
        tree.body[-1:] = last.body


def _as_function(tree: ast.Module) -> str:
    """Imports at module level, everything else inside ``_lcb_main``."""
    imports = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    rest = [s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom))]
    arguments = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
    main = ast.FunctionDef(name=_MAIN, args=arguments, body=rest or [ast.Pass()], decorator_list=[])
    module = ast.fix_missing_locations(ast.Module(body=[*imports, main], type_ignores=[]))
    return ast.unparse(module)


def stdin_program(code: str) -> str:
    """The program LCB runs for a stdin/stdout item (unparsable code is left to fail as it is)."""
    try:
        tree = ast.parse(code)
        _unwrap_main_guard(tree)
        body = _as_function(tree)
    except (SyntaxError, ValueError, RecursionError):
        return PRELUDE + code
    return f"{PRELUDE}{body}\ntry:\n    {_MAIN}()\nexcept SystemExit:\n    pass\n"


_CALL_HARNESS = """

def _lcb_check(_marker):
    _json = __import__("json")
    _inputs, _expected = _json.loads(__import__("sys").stdin.read())
    _got = {target}(*[_json.loads(_line) for _line in _inputs.split("\\n")])
    _got = list(_got) if isinstance(_got, tuple) else _got
    _verdict = "1" if _got == _json.loads(_expected) else "0"
    print("\\n" + _marker + _verdict + repr(_got)[:80])


_lcb_check({marker!r})
"""


def call_program(code: str, entry: str) -> tuple[str, str]:
    """(program, marker) for a call-based item: the program prints marker + "1" when the call's result
    equals the expected output it reads, with the test, from stdin (see :func:`call_stdin`)."""
    marker = f"@lcb-{secrets.token_hex(8)}@"
    target = f"Solution().{entry}" if "class Solution" in code else entry
    return PRELUDE + "\n" + code + _CALL_HARNESS.format(target=target, marker=marker), marker


def call_stdin(test_input: str, test_output: str) -> str:
    return json.dumps([test_input, test_output])


def call_verdict(stdout: str, marker: str) -> tuple[bool, str]:
    """(passed, what the call returned) from a call-based program's output."""
    last = stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.startswith(marker):
        return False, "the call did not return"
    return last[len(marker)] == "1", last[len(marker) + 1 :]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _numbers(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except (InvalidOperation, ValueError):
        return None


def _same_line(expected: str, actual: str) -> bool:
    if expected == actual:
        return True
    want, got = _numbers(expected), _numbers(actual)
    try:
        return want is not None and got is not None and want == got
    except InvalidOperation:  # a signalling NaN
        return False


def same_stdout(expected: str, actual: str) -> bool:
    """LCB's stdout comparison (see the module docstring)."""
    want, got = _lines(expected), _lines(actual)
    return len(want) == len(got) and all(map(_same_line, want, got))
