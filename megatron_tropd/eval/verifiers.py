"""Verifiers: decide whether one model response answers one benchmark item.

Every verifier returns a :class:`Verdict` (correct + a reason when it is not). :func:`verify_item` is the
only entry point the evaluator uses; it turns a crash inside a verifier into a failed verdict carrying the
exception, so one bad sample never stops an evaluation.

Math uses ``math-verify`` (symbolic equivalence of LaTeX / plain answers) when it is installed and a small
sympy comparison otherwise; :data:`MATH_BACKEND` says which is active.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace

import sympy
from sympy.parsing.sympy_parser import (
    implicit_multiplication_application,
    parse_expr,
    rationalize,
    standard_transformations,
)

from megatron_tropd.eval import livecodebench
from megatron_tropd.eval.instructions import CHECKERS
from megatron_tropd.eval.sandbox import SandboxLimits, run_program
from megatron_tropd.eval.schema import LETTERS, CodeTest, Item

try:
    import math_verify

    MATH_BACKEND = "math-verify"
except ImportError:  # the sympy fallback below keeps math scoring available
    math_verify = None
    MATH_BACKEND = "sympy"


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str = ""


# ---------------------------------------------------------------------------------------------- math


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for index in range(position, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[position:index].strip()
    return None  # unbalanced: a truncated response


_FINAL_ANSWER = re.compile(
    r"final answer\s*(?:is|:)?\s*:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE
)


def extract_final_answer(text: str) -> str | None:
    """The response's final answer: the last ``\\boxed{}``, else the last "final answer is X" line."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER.findall(text)
    return matches[-1].strip() if matches else None


_LATEX_NESTED = [
    (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"),
    (r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
]
_LATEX_FLAT = [
    (r"\\left|\\right|\\!|\\,|\\;|\$|\\%|%", ""),
    (r"\\cdot|\\times", "*"),
    (r"\^", "**"),
    (r"\\pi", "pi"),
    (r"\\text\{([^{}]*)\}", r"\1"),
    (r"\{", "("),
    (r"\}", ")"),
    (r",", ""),
    (r"(?<![\d.])0+(?=\d)", ""),  # 070 -> 70: Python rejects leading zeros
]
_TRANSFORMATIONS = (*standard_transformations, implicit_multiplication_application, rationalize)


_SAFE_NAMES = {"sqrt", "pi", "E", "I", "oo", "log", "ln", "exp", "sin", "cos", "tan"}


def _refuse_unsafe(text: str) -> None:
    """parse_expr evaluates Python: admit only arithmetic, one-letter symbols and a few functions."""
    names = re.findall(r"[A-Za-z]+", text)
    if (
        not re.fullmatch(r"[A-Za-z0-9 +\-*/().]*", text)
        or re.search(r"\.(?!\d)", text)
        or any(len(name) > 1 and name not in _SAFE_NAMES for name in names)
    ):
        raise ValueError(f"not a plain arithmetic expression: {text!r}")


def _to_sympy(answer: str):
    """LaTeX-ish answer -> sympy expression; innermost \\sqrt / \\frac first, until nothing changes."""
    text = re.sub(r"\\[dt]?frac(\d)(\d)", r"\\frac{\1}{\2}", answer.strip().rstrip("."))
    previous = None
    while previous != text:
        previous = text
        for pattern, replacement in _LATEX_NESTED:
            text = re.sub(pattern, replacement, text)
    for pattern, replacement in _LATEX_FLAT:
        text = re.sub(pattern, replacement, text)
    _refuse_unsafe(text)
    return parse_expr(text, transformations=_TRANSFORMATIONS, evaluate=True)


def _squash(answer: str) -> str:
    """String form for answers sympy cannot read (intervals, words): no spaces, $, \\left, \\text."""
    return re.sub(r"\s|\$|\\left|\\right|\\text\{|\\mathrm\{|[{}]", "", answer)


def _sympy_equal(reference: str, candidate: str) -> bool:
    """Fallback equivalence: simplify(ref - cand) == 0, else normalised string equality."""
    try:
        return sympy.simplify(_to_sympy(reference) - _to_sympy(candidate)) == 0
    except (sympy.SympifyError, TypeError, SyntaxError, ValueError, AttributeError):
        return _squash(reference) == _squash(candidate)


def verify_math(response: str, answer: str) -> Verdict:
    """Correct when the response's final answer is mathematically equal to ``answer``."""
    candidate = extract_final_answer(response)
    if candidate is None:
        return Verdict(False, "no final answer (no \\boxed{} and no 'final answer' line)")
    if math_verify is not None:
        # math-verify times out with SIGALRM, which only the main thread may use.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = math_verify.parse(f"${answer}$", parsing_timeout=timeout)
        predicted = math_verify.parse(f"${candidate}$", parsing_timeout=timeout)
        if not gold:
            raise ValueError(f"math-verify could not parse the reference answer {answer!r}")
        correct = bool(predicted) and math_verify.verify(gold, predicted, timeout_seconds=timeout)
    else:
        correct = _sympy_equal(answer, candidate)
    return Verdict(True) if correct else Verdict(False, f"answer {candidate!r} != reference {answer!r}")


# ----------------------------------------------------------------------------------- multiple choice

_LETTER = r"(\([A-Za-z]\)|[A-Z](?![A-Za-z]))"  # "(b)" or a capital standing alone, never the word "a"
_CHOICE_PATTERNS = [  # most explicit first; within a pattern the last match wins
    rf"\\boxed\{{\s*(?:\\text\{{)?{_LETTER}",
    rf"(?i:answer)(?:\s+(?i:is)|\s*:)?\s*\**:?\s*{_LETTER}",
    r"(\([A-Z]\))",
    rf"^\s*{_LETTER}[.:]?\s*$",
]


def extract_choice(response: str, num_options: int) -> str | None:
    """The chosen option letter ("Answer: C", "(C)", "\\boxed{C}", a lone "C"), or None."""
    valid = LETTERS[:num_options]
    for pattern in _CHOICE_PATTERNS:
        letters = [m.strip("()").upper() for m in re.findall(pattern, response, re.MULTILINE)]
        letters = [letter for letter in letters if letter in valid]
        if letters:
            return letters[-1]
    return None


def verify_multiple_choice(response: str, answer: str, num_options: int) -> Verdict:
    choice = extract_choice(response, num_options)
    if choice is None:
        return Verdict(False, "no option letter found")
    return Verdict(True) if choice == answer else Verdict(False, f"chose {choice}, answer is {answer}")


# ------------------------------------------------------------------------------------- instructions


def loose_variants(response: str) -> list[str]:
    """IFEval's loose forms of a response, as lm-eval and IFBench build them: the response, and it without
    its first line, its last line or both (each stripped), each also with the markdown ``*`` removed."""
    lines = response.split("\n")
    cut = ["\n".join(part).strip() for part in (lines[1:], lines[:-1], lines[1:-1])]
    forms = [response, *cut]
    return forms + [form.replace("*", "") for form in forms]


def verify_instructions(response: str, item: Item, loose: bool = False) -> Verdict:
    """Correct when every constraint holds: IFEval's strict prompt-level accuracy, or with ``loose`` the
    loose one, where a constraint holds if any of ``loose_variants`` satisfies it."""
    forms = loose_variants(response) if loose else [response]
    failed = [
        c.type
        for c in item.constraints
        if not any(CHECKERS[c.type](form, **c.kwargs) for form in forms if form.strip())
    ]
    return Verdict(not failed, f"failed constraints: {failed}" if failed else "")


# --------------------------------------------------------------------------------------------- code

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str | None:
    """The last fenced code block (```python ... ```), or None."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else None


def _run_stdin_test(program: str, test: CodeTest, limits: SandboxLimits) -> str | None:
    """None when the test passes, else why not."""
    result = run_program(program, test.input, limits)
    if not result.ok:
        return f"{result.status}: {result.reason}"
    if not livecodebench.same_stdout(test.output, result.stdout):
        return f"wrong output {result.stdout[:80]!r}"
    return None


def _run_call_test(program: tuple[str, str], test: CodeTest, limits: SandboxLimits) -> str | None:
    source, marker = program
    result = run_program(source, livecodebench.call_stdin(test.input, test.output), limits)
    if not result.ok:
        return f"{result.status}: {result.reason}"
    passed, returned = livecodebench.call_verdict(result.stdout, marker)
    return None if passed else f"wrong output {returned}"


def verify_code(response: str, item: Item, limits: SandboxLimits | None = None) -> Verdict:
    """Run the response's program on every test in the sandbox, graded as LiveCodeBench grades
    (:mod:`megatron_tropd.eval.livecodebench`); the first failing test is the reason."""
    code = extract_code(response)
    if code is None:
        return Verdict(False, "no fenced code block in the response")
    limits = limits or SandboxLimits()
    if item.timeout_seconds is not None:
        limits = replace(limits, wall_seconds=item.timeout_seconds)
    if item.entry is None:
        program, run_test = livecodebench.stdin_program(code), _run_stdin_test
    else:
        program, run_test = livecodebench.call_program(code, item.entry), _run_call_test
    for index, test in enumerate(item.tests):
        failure = run_test(program, test, limits)
        if failure is not None:
            return Verdict(False, f"test {index}: {failure}")
    return Verdict(True)


# ------------------------------------------------------------------------------------------ dispatch


def _dispatch(
    family: str, item: Item, response: str, code_limits: SandboxLimits | None, loose: bool
) -> Verdict:
    if family == "math":
        return verify_math(response, item.answer)
    if family == "multiple_choice":
        return verify_multiple_choice(response, item.answer, len(item.options))
    if family == "instruction":
        return verify_instructions(response, item, loose)
    if family == "code":
        return verify_code(response, item, code_limits)
    raise ValueError(f"unknown benchmark family {family!r}")


def verify_item(
    family: str, item: Item, response: str, code_limits: SandboxLimits | None = None, loose: bool = False
) -> Verdict:
    """Verify one response; a crash in the verifier is a failed verdict with the reason, never a raise.
    ``loose``: the loose instruction-following score (see ``verify_instructions``)."""
    try:
        return _dispatch(family, item, response, code_limits, loose)
    except Exception as error:  # noqa: BLE001 - any verifier bug must not end the evaluation
        return Verdict(False, f"verifier error: {type(error).__name__}: {error}")
