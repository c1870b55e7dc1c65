"""The fidelity task: multi-step arithmetic whose worked chain is followed by a long span of "thinking"
words, over a word-level vocabulary of 4,096 tokens.

A problem is a start value and ``STEPS`` operations, each labelled in the prompt::

    prompt:   "Q: 7 S1 +5 S2 -4 S3 +3 A:"
    teacher:  "S1 7 +5 = 12 S2 12 -4 = 8 S3 8 +3 = 11 <170-210 words> Final answer: 11"

The thinking words (``w0`` .. ``w4050``) carry no information; the teacher's writer draws them from a
Zipf law over all of them, so the teacher is heavy-tailed: its top 64 words hold about half of the mass at
a thinking position (``zipf_topk_mass``). After the chain the writer reflects at length (170-210 thinking
words) before the final answer, so a trace is about 209 tokens, most of them from the heavy tail, and the
answer must be carried across the reflection. The chain itself is compact, as in the demo: each line's
operation sits at a fixed offset in the prompt and its previous value a few tokens back.

Long reflections drown the chain in the SFT loss (a tenth of the tokens): a 4-layer teacher trained 400
steps on them reached 3% held-out accuracy (an earlier layout, spans of 4-10 words between the lines and
47-token traces, reached 22% in 500 steps). So both models start their SFT on short reflections
(``Writer.short``, 2-12 words, where the chain is half of the loss) and end it on the long ones; the
writer they imitate at the end, and the one the traces are measured on, is the long one. Carrying the answer
across the reflection is learnt on the long writer only: the teacher needs several hundred steps of it
(``study.StudySize``).

The student's writer has three habits that the teacher's writer never shows, so its tokens are outliers
to the teacher (pi_T << pi_S):

- a favourite word ``hmm`` (a share of its thinking words) that the teacher never writes;
- skipped steps: a step line is left out and the next one starts from the silently updated value, so the
  student must do two operations in one line (and a whole chain is sometimes skipped for a guess);
- slips: a step's result is off by one or two, and later steps build on it.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, replace
from functools import lru_cache

from megatron_tropd.demo import task as demo_task

MAX_VALUE = 20
STEPS = 3
OPERANDS = range(1, 7)
TOKENS = 4096  # the vocabulary, with the tokenizer's 2 specials
FAVOURITE = "hmm"  # the student's favourite word; the teacher's writer never uses it
ZIPF_EXPONENT = 1.0
REFLECTION = (170, 210)  # thinking words between the chain and the final answer: the long part
SHORT_REFLECTION = (2, 12)  # the first SFT steps' reflections (``Writer.short``), see the module doc
OPERATIONS = {"+": operator.add, "-": operator.sub}
FINAL = "Final answer:"


@dataclass(frozen=True)
class Problem(demo_task.Problem):
    """The demo's problem (its running values and answer), with each step labelled in the prompt."""

    @property
    def prompt(self) -> str:
        labelled = [f"S{i + 1} {op}{operand}" for i, (op, operand) in enumerate(self.steps)]
        return "Q: " + " ".join([str(self.start)] + labelled) + " A:"


def _allowed_steps(value: int) -> list[tuple[str, int]]:
    """Every (operation, operand) that keeps the running value inside ``[0, MAX_VALUE]``."""
    steps = [("+", b) for b in OPERANDS if value + b <= MAX_VALUE]
    return steps + [("-", b) for b in OPERANDS if value - b >= 0]


def make_problem(rng: random.Random) -> Problem:
    value = rng.randint(1, 9)
    start, steps = value, []
    for _ in range(STEPS):
        step = rng.choice(_allowed_steps(value))
        steps.append(step)
        value = OPERATIONS[step[0]](value, step[1])
    return Problem(start, tuple(steps))


def problems(seed: int, count: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[Problem]:
    """``count`` distinct problems whose prompts are not in ``exclude`` (to keep held-out data unseen)."""
    return demo_task.problems(seed, count, exclude, make=make_problem)


@lru_cache(maxsize=1)
def _zipf_cumulative() -> list[float]:
    weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(WORDS)]
    total, running, cumulative = sum(weights), 0.0, []
    for weight in weights:
        running += weight / total
        cumulative.append(running)
    return cumulative


def zipf_topk_mass(k: int) -> float:
    """The teacher writer's probability mass on its ``k`` most frequent thinking words."""
    return _zipf_cumulative()[k - 1]


def _words(rng: random.Random, favourite_rate: float, span: tuple[int, int]) -> list[str]:
    count = rng.randint(*span)
    ranks = rng.choices(range(WORDS), cum_weights=_zipf_cumulative(), k=count)
    return [FAVOURITE if rng.random() < favourite_rate else f"w{rank}" for rank in ranks]


def _structure_words() -> list[str]:
    numbers = [str(n) for n in range(MAX_VALUE + 1)]
    operands = [f"{op}{b}" for op in OPERATIONS for b in OPERANDS]
    markers = [f"S{i + 1}" for i in range(STEPS)]
    return ["Q:", "A:", "=", "Final", "answer:", FAVOURITE, *numbers, *operands, *markers]


WORDS = TOKENS - 2 - len(_structure_words())  # thinking words w0 .. w{WORDS - 1}


def vocabulary() -> list[str]:
    """Every word the task's writers can produce (the tokenizer's vocabulary, besides its 2 specials)."""
    return _structure_words() + [f"w{rank}" for rank in range(WORDS)]


@dataclass(frozen=True)
class Writer:
    """A writer of responses; the defaults are the teacher's (every step, no slips, no favourite word)."""

    chain_skip_rate: float = 0.0  # the whole chain is skipped for a guess near the answer
    step_skip_rate: float = 0.0  # one step line is left out (the value is still updated)
    slip_rate: float = 0.0  # a step's result is off by one or two
    favourite_rate: float = 0.0  # share of thinking words replaced by FAVOURITE
    reflection: tuple[int, int] = REFLECTION  # thinking words between the chain and the final answer

    def short(self) -> Writer:
        """The same writer with short reflections: the first steps of its SFT (the curriculum)."""
        return replace(self, reflection=SHORT_REFLECTION)

    def __call__(self, problem: Problem, rng: random.Random) -> str:
        parts = []
        if rng.random() < self.chain_skip_rate:
            guess = min(MAX_VALUE, max(0, problem.answer + rng.choice((-3, -2, -1, 0, 0, 1, 2, 3))))
            parts += _words(rng, self.favourite_rate, self.reflection)
            return " " + " ".join(parts + [FINAL, str(guess)])
        value = shown = problem.start
        pending: list[str] = []  # operations of skipped lines, written with the next line
        for index, (operation, operand) in enumerate(problem.steps):
            value = OPERATIONS[operation](value, operand)
            if rng.random() < self.slip_rate:
                value = min(MAX_VALUE, max(0, value + rng.choice((-2, -1, 1, 2))))
            pending.append(f"{operation}{operand}")
            last = index == len(problem.steps) - 1
            if not last and rng.random() < self.step_skip_rate:
                continue  # the next line holds this operation and its own: two in one line
            parts += [f"S{index + 1}", str(shown), *pending, "=", str(value)]
            shown, pending = value, []
        parts += _words(rng, self.favourite_rate, self.reflection)
        return " " + " ".join(parts + [FINAL, str(value)])


TEACHER_WRITER = Writer()
STUDENT_WRITER = Writer(chain_skip_rate=0.25, step_skip_rate=0.3, slip_rate=0.05, favourite_rate=0.15)
