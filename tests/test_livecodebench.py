"""Code items are graded as LiveCodeBench grades them: each expected verdict follows from LCB's rules
(stripped line-wise stdout comparison, exact Decimal equality of numeric tokens, its preloaded imports,
its recursion limit, its module-as-function wrapping of stdin programs, == on call results)."""

import pytest

from megatron_tropd.eval import livecodebench
from megatron_tropd.eval.sandbox import SandboxLimits
from megatron_tropd.eval.schema import CodeTest, Item
from megatron_tropd.eval.verifiers import verify_code

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_bytes=256 << 20)


@pytest.mark.parametrize(
    "expected, actual, same",
    [
        ("3", "3   \n", True),  # trailing spaces
        ("3", "   3", True),  # leading spaces
        ("1\n2", "\n\n1\n2\n\n\n", True),  # blank lines around the output
        ("1\n2", "1\n\n2", False),  # a blank line inside it changes the line count
        ("1\n2", "1\r\n2\r\n", True),
        ("3", "3.0", True),  # equal as Decimals
        ("3", "3.0000001", False),  # no tolerance
        ("100", "1e2", True),
        ("1 2", "1   2", True),  # numeric tokens, any spacing
        ("a b", "a   b", False),  # words must match exactly
        ("YES", "yes", False),
        ("0.1 0.2", "0.10 0.200", True),
    ],
)
def test_stdout_comparison_rules(expected, actual, same):
    assert livecodebench.same_stdout(expected, actual) is same


STDIN_CASES = [
    # (program, stdin, expected stdout, LCB verdict)
    ("print(' ' + input() + '.0 ')", "7\n", "7", True),
    ("print(1)\nprint()\nprint(2)", "", "1\n2", False),
    (
        "print(gcd(12, 18), heappop([5]), bisect_left([1, 3], 2), isqrt(17), comb(5, 2))",
        "",
        "6 5 1 4 10",
        True,
    ),
    ("print(Counter('aab')['a'], reduce(add, [1, 2, 3]), deque([1]).pop())", "", "2 6 1", True),
    ("def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nprint(f(30000))", "", "30000", True),
    ("print(3)\nsys.exit(1)", "", "3", True),  # SystemExit ends the run; the output is graded
    ("x = 1\ndef g():\n    global x\n    return x\nprint(g())", "", "1", False),  # x is not a global
    ("if __name__ == '__main__':\n    print(5)", "", "5", True),  # the final guard is unwrapped
    ("if '__main__' == __name__:\n    print(5)", "", "5", False),  # other spellings are not
    ("print(datetime.date(2024, 5, 6).day)", "", "6", True),  # `datetime` is the module
]


@pytest.mark.parametrize("program, stdin, expected, verdict", STDIN_CASES)
def test_stdin_programs_get_lcb_verdicts(program, stdin, expected, verdict):
    item = Item("s", "p", tests=(CodeTest(stdin, expected),))
    assert verify_code(f"```python\n{program}\n```", item, LIMITS).correct is verdict


CALL_CASES = [
    # (code, entry, input lines, expected JSON, LCB verdict)
    ("class Solution:\n    def f(self, a):\n        return (a, a)", "f", "1", "[1, 1]", True),
    ("class Solution:\n    def f(self, a):\n        return [(a, a)]", "f", "1", "[[1, 1]]", False),
    (
        "class Solution:\n    def f(self, a: List[int]) -> float:\n        return max(a, default=-inf)",
        "f",
        "[]",
        "-Infinity",
        True,
    ),
    ("class Solution:\n    def f(self, a, b):\n        return float(a + b)", "f", "1\n2", "3", True),
    (
        "def total(nums):\n    h = []\n    for x in nums:\n        heappush(h, x)\n    return h[0]",
        "total",
        "[4, 2, 9]",
        "2",
        True,
    ),
    (
        "class Solution:\n    def f(self, n):\n        return n if n < 2 else self.f(n - 1)",
        "f",
        "20000",
        "1",
        True,
    ),
]


@pytest.mark.parametrize("code, entry, inputs, expected, verdict", CALL_CASES)
def test_call_based_items_get_lcb_verdicts(code, entry, inputs, expected, verdict):
    item = Item("c", "p", tests=(CodeTest(inputs, expected),), entry=entry)
    assert verify_code(f"```python\n{code}\n```", item, LIMITS).correct is verdict


def test_call_based_output_printed_by_the_solution_is_ignored():
    code = "class Solution:\n    def f(self, _):\n        print('noise')\n        return 'ok'"
    item = Item("c", "p", tests=(CodeTest("0", '"ok"'),), entry="f")
    verdict = verify_code(f"```python\n{code}\n```", item, LIMITS)
    assert verdict.correct, verdict.reason


def test_preloaded_imports_and_recursion_limit_are_lcbs():
    assert livecodebench.RECURSION_LIMIT == 50_000
    for name in ("heapq", "bisect", "math", "statistics", "operator", "typing", "builtins"):
        assert f"from {name} import *" in livecodebench.PRELUDE
