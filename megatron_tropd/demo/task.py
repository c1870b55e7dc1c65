"""The demo's synthetic reasoning task: multi-step integer arithmetic, evaluated left to right.

A problem is a start value and 2-4 operations; every intermediate value stays in ``[0, MAX_VALUE]``::

    prompt:   "Q: 7 +5 -4 *2 A:"
    teacher:  " 7+5=12; 12-4=8; 8*2=16; Final answer: 16"

The teacher learns this worked chain. The student learns from a noisier writer (``noisy_response``): it
sometimes skips the chain and guesses, and sometimes slips by one or two on a step (carrying the slip on,
so its chains stay self-consistent but end in a wrong answer). The two models therefore really disagree,
token by token, which is the situation on-policy distillation is for. The final line reads
"Final answer: N", which the package's math verifier extracts.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

MAX_VALUE = 20
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[tuple[str, int], ...]  # (operation, operand), applied left to right

    @property
    def values(self) -> list[int]:
        """The running value after each step (the chain's right-hand sides)."""
        values, value = [], self.start
        for operation, operand in self.steps:
            value = apply(value, operation, operand)
            values.append(value)
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        return "Q: " + " ".join([str(self.start)] + [f"{op}{operand}" for op, operand in self.steps]) + " A:"


def apply(value: int, operation: str, operand: int) -> int:
    return OPERATIONS[operation](value, operand)


def _allowed_steps(value: int) -> list[tuple[str, int]]:
    """Every (operation, operand) that keeps the running value inside ``[0, MAX_VALUE]``."""
    steps = [("+", b) for b in range(1, 10) if value + b <= MAX_VALUE]
    steps += [("-", b) for b in range(1, 10) if value - b >= 0]
    steps += [("*", b) for b in range(2, 4) if value * b <= MAX_VALUE]
    return steps


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4) -> Problem:
    value, steps = rng.randint(1, 9), []
    start = value
    for _ in range(rng.randint(min_steps, max_steps)):
        step = rng.choice(_allowed_steps(value))
        steps.append(step)
        value = apply(value, *step)
    return Problem(start, tuple(steps))


def _chain(start: int, steps, values) -> str:
    previous = [start] + list(values[:-1])
    lines = [f"{a}{op}{b}={c}" for a, (op, b), c in zip(previous, steps, values, strict=True)]
    return " " + "; ".join(lines) + f"; Final answer: {values[-1]}"


def teacher_response(problem: Problem) -> str:
    """The worked chain, always right."""
    return _chain(problem.start, problem.steps, problem.values)


def noisy_response(problem: Problem, rng: random.Random, skip_rate: float, slip_rate: float) -> str:
    """The student's writer: with ``skip_rate`` a bare guess near the answer; otherwise the chain, where
    each step slips by +-1 or +-2 with ``slip_rate`` and later steps build on the slipped value."""
    if rng.random() < skip_rate:
        guess = max(0, problem.answer + rng.choice((-3, -2, -1, 0, 0, 1, 2, 3)))
        return f" Final answer: {guess}"
    value, values = problem.start, []
    for operation, operand in problem.steps:
        value = apply(value, operation, operand)
        if rng.random() < slip_rate:
            value = max(0, value + rng.choice((-2, -1, 1, 2)))
        values.append(value)
    return _chain(problem.start, problem.steps, values)


def problems(
    seed: int,
    count: int,
    exclude: set[str] = frozenset(),
    make: Callable[[random.Random], Problem] | None = None,
) -> list[Problem]:
    """``count`` distinct problems of ``make`` (default ``make_problem``) whose prompts are not in
    ``exclude`` (to keep held-out data unseen)."""
    make = make or make_problem
    rng, found, seen = random.Random(seed), [], set(exclude)
    while len(found) < count:
        problem = make(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            found.append(problem)
    return found
