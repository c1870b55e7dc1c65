"""Benchmarks as data: one JSONL schema per family, and a loader that validates every line.

One benchmark is one JSONL file, one JSON object per line. The family fixes the fields:

``math``            ``{"id": str, "prompt": str, "answer": str}``
                    ``answer`` is the reference final answer (LaTeX or plain), compared symbolically.
``code``            ``{"id": str, "prompt": str, "tests": [{"input": str, "output": str}, ...],
                    "entry": str (optional), "timeout_seconds": number (optional)}``
                    Tests are stdin/stdout cases; outputs are compared after stripping trailing whitespace
                    on each line. ``entry`` names a function (LeetCode style, as in LiveCodeBench's
                    functional tests): each input line is then one JSON argument and the output the JSON
                    return value. ``timeout_seconds`` is the wall limit per test.
``instruction``     ``{"id": str, "prompt": str, "constraints": [{"type": str, "kwargs": {...}}, ...]}``
                    ``type`` is a checker registered in :mod:`megatron_tropd.eval.instructions`;
                    ``kwargs`` must match its signature.
``multiple_choice`` ``{"id": str, "question": str, "options": [str, ...], "answer": "A".."Z"}``
                    ``options`` are listed in letter order; ``answer`` is the correct letter.

A directory of benchmarks holds the JSONL files plus ``benchmarks.json``, mapping each benchmark name to
``{"family": ..., "file": ...}`` (written by ``tools/prepare_benchmarks.py``), with optional keys:

``"loose": true``   instruction following only: score the loose prompt-level accuracy.
``"domain": str``   the domain the benchmark reports under (default: its family). Reports average the
                    benchmarks of each domain; naming them as the teachers' domains (``math``, ``code``,
                    ``science``) gives the domain of each teacher its own score.

Any invalid line raises ``ValueError("<file>:<line>: field '<field>': <problem>")``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_tropd.eval.instructions import CHECKERS, checker_arguments, unavailable

FAMILIES = ("math", "code", "instruction", "multiple_choice")
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class CodeTest:
    input: str
    output: str


@dataclass(frozen=True)
class Constraint:
    type: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One benchmark prompt. Family-specific fields are None when they do not apply."""

    id: str
    prompt: str
    answer: str | None = None
    tests: tuple[CodeTest, ...] = ()
    entry: str | None = None
    timeout_seconds: float | None = None
    constraints: tuple[Constraint, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    name: str
    family: str
    items: tuple[Item, ...]
    loose: bool = False
    """Instruction following only: score IFEval's loose prompt-level accuracy (``benchmarks.json``
    entry ``"loose": true``), as the paper reports for IFBench."""
    domain: str = ""
    """What per-domain averages group it under (``benchmarks.json`` entry ``"domain"``); empty means its
    family."""

    def __post_init__(self):
        if not self.domain:
            object.__setattr__(self, "domain", self.family)


class _LineError(Exception):
    """Internal: a problem with one field; the loader adds file and line."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(field_name, problem)
        self.field_name, self.problem = field_name, problem


def _get(row: dict, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    if name not in row or row[name] is None:
        if required:
            raise _LineError(name, "missing")
        return None
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _LineError(name, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, str) and required and not value.strip():
        raise _LineError(name, "empty string")
    return value


def _parse_math(row: dict) -> Item:
    return Item(id=_get(row, "id", str), prompt=_get(row, "prompt", str), answer=_get(row, "answer", str))


def _parse_code(row: dict) -> Item:
    tests = _get(row, "tests", list)
    if not tests:
        raise _LineError("tests", "at least one test is needed")
    parsed = []
    for index, test in enumerate(tests):
        if (
            not isinstance(test, dict)
            or not isinstance(test.get("input"), str)
            or not isinstance(test.get("output"), str)
        ):
            raise _LineError(f"tests[{index}]", 'expected {"input": str, "output": str}')
        parsed.append(CodeTest(test["input"], test["output"]))
    timeout = _get(row, "timeout_seconds", (int, float), required=False)
    if timeout is not None and timeout <= 0:
        raise _LineError("timeout_seconds", "must be positive")
    return Item(
        id=_get(row, "id", str),
        prompt=_get(row, "prompt", str),
        tests=tuple(parsed),
        entry=_get(row, "entry", str, required=False),
        timeout_seconds=timeout,
    )


def _parse_constraint(index: int, raw: Any) -> Constraint:
    where = f"constraints[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise _LineError(where, 'expected {"type": str, "kwargs": {...}}')
    if raw["type"] not in CHECKERS:
        raise _LineError(f"{where}.type", f"unknown checker {raw['type']!r}; known: {sorted(CHECKERS)}")
    if reason := unavailable(raw["type"]):
        raise _LineError(f"{where}.type", reason)
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _LineError(f"{where}.kwargs", "expected an object")
    required, optional = checker_arguments(raw["type"])
    if missing := required - kwargs.keys():
        raise _LineError(f"{where}.kwargs", f"missing {sorted(missing)}")
    if unknown := kwargs.keys() - required - optional:
        accepted = sorted(required | optional)
        raise _LineError(f"{where}.kwargs", f"unknown {sorted(unknown)}; accepted {accepted}")
    return Constraint(raw["type"], dict(kwargs))


def _parse_instruction(row: dict) -> Item:
    constraints = _get(row, "constraints", list)
    if not constraints:
        raise _LineError("constraints", "at least one constraint is needed")
    parsed = tuple(_parse_constraint(i, c) for i, c in enumerate(constraints))
    return Item(id=_get(row, "id", str), prompt=_get(row, "prompt", str), constraints=parsed)


def _parse_multiple_choice(row: dict) -> Item:
    options = _get(row, "options", list)
    if len(options) < 2 or len(options) > len(LETTERS) or not all(isinstance(o, str) for o in options):
        raise _LineError("options", f"expected 2 to {len(LETTERS)} strings")
    answer = _get(row, "answer", str)
    if answer not in LETTERS[: len(options)]:
        raise _LineError("answer", f"expected a letter A..{LETTERS[len(options) - 1]}, got {answer!r}")
    return Item(
        id=_get(row, "id", str), prompt=_get(row, "question", str), answer=answer, options=tuple(options)
    )


_PARSERS = {
    "math": _parse_math,
    "code": _parse_code,
    "instruction": _parse_instruction,
    "multiple_choice": _parse_multiple_choice,
}


def parse_item(row: Any, family: str) -> Item:
    """Validate one decoded row; raises ValueError naming the field (no file context)."""
    if not isinstance(row, dict):
        raise ValueError("field '<line>': expected a JSON object")
    try:
        return _PARSERS[family](row)
    except _LineError as error:
        raise ValueError(f"field '{error.field_name}': {error.problem}") from None


def load_benchmark(path: str | Path, family: str, name: str | None = None) -> Benchmark:
    """Read and validate a JSONL benchmark; the first bad line raises ValueError naming file/line/field."""
    if family not in FAMILIES:
        raise ValueError(f"unknown benchmark family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    items, seen = [], set()
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = parse_item(json.loads(line), family)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: field '<line>': invalid JSON ({error.msg})") from None
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        if item.id in seen:
            raise ValueError(f"{path}:{line_number}: field 'id': duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items; a benchmark needs at least one line")
    return Benchmark(name=name or path.stem, family=family, items=tuple(items))


def load_benchmarks(directory: str | Path, names: list[str] | None = None) -> list[Benchmark]:
    """Load the benchmarks listed in ``directory/benchmarks.json`` (all, or those in ``names``)."""
    directory = Path(directory)
    manifest = json.loads((directory / "benchmarks.json").read_text(encoding="utf-8"))
    wanted = names or list(manifest)
    if unknown := [n for n in wanted if n not in manifest]:
        manifest_path = directory / "benchmarks.json"
        raise ValueError(f"benchmarks {unknown} not in {manifest_path}; have {list(manifest)}")
    return [_load_entry(directory, n, manifest[n]) for n in wanted]


def _load_entry(directory: Path, name: str, entry: dict) -> Benchmark:
    benchmark = load_benchmark(directory / entry["file"], entry["family"], name)
    loose = entry.get("loose", False)
    if not isinstance(loose, bool) or (loose and benchmark.family != "instruction"):
        raise ValueError(
            f"{directory / 'benchmarks.json'}: benchmark {name!r}: 'loose' must be true or false, and "
            "only instruction-following benchmarks have a loose score"
        )
    return replace(benchmark, loose=loose, domain=_entry_domain(directory, name, entry, benchmark.family))


def _entry_domain(directory: Path, name: str, entry: dict, family: str) -> str:
    """The entry's ``"domain"``, or the family where it has none."""
    domain = entry.get("domain", family)
    if not isinstance(domain, str) or not domain or domain != domain.strip():
        raise ValueError(
            f"{directory / 'benchmarks.json'}: benchmark {name!r}: 'domain' must be a non-empty string "
            f"without surrounding spaces (leave it out to report under the family {family!r}), got {domain!r}"
        )
    return domain
