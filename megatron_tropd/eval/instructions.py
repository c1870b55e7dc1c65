"""Verifiable instruction-following constraints (IFEval / IFBench style), one small function each.

A constraint in a benchmark file is ``{"type": <registered name>, "kwargs": {...}}``; the checker is
called as ``checker(response, **kwargs)`` and returns True when the response satisfies it. Bounds are
inclusive. The schema loader validates types and keyword names against :data:`CHECKERS`, so a typo in a
benchmark file fails at load time, not silently at scoring time. IFBench's own constraints live in
:mod:`megatron_tropd.eval.ifbench` under their IFBench ids, and IFEval's in :mod:`megatron_tropd.eval.ifeval`
under their IFEval ids (scored by lm-eval's checkers); both join this registry on import. The checkers
below are this project's own vocabulary for hand-written benchmark files.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable

from megatron_tropd.eval import ifeval
from megatron_tropd.eval.ifbench import IFBENCH_CHECKERS

CHECKERS: dict[str, Callable[..., bool]] = {}


def register(name: str):
    """Add a checker under ``name`` (the ``type`` used in benchmark files)."""

    def wrap(function: Callable[..., bool]) -> Callable[..., bool]:
        assert name not in CHECKERS, f"duplicate checker {name}"
        CHECKERS[name] = function
        return function

    return wrap


def checker_arguments(name: str) -> tuple[set[str], set[str]]:
    """(required, optional) keyword names of a checker; the schema validates files against them."""
    params = list(inspect.signature(CHECKERS[name]).parameters.values())[1:]
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    return required, {p.name for p in params} - required


def _within(count: int, minimum: int | None, maximum: int | None) -> bool:
    return (minimum is None or count >= minimum) and (maximum is None or count <= maximum)


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+(?:['-]\w+)*\b", text)


@register("word_count")
def word_count(response: str, min_words: int | None = None, max_words: int | None = None) -> bool:
    return _within(len(_words(response)), min_words, max_words)


@register("sentence_count")
def sentence_count(response: str, min_sentences: int | None = None, max_sentences: int | None = None) -> bool:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", response.strip()) if s.strip()]
    return _within(len(sentences), min_sentences, max_sentences)


@register("include_keywords")
def include_keywords(response: str, keywords: list[str]) -> bool:
    lowered = response.lower()
    return all(keyword.lower() in lowered for keyword in keywords)


@register("forbidden_words")
def forbidden_words(response: str, words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", response, re.IGNORECASE) for w in words)


@register("keyword_frequency")
def keyword_frequency(
    response: str, keyword: str, min_count: int | None = None, max_count: int | None = None
) -> bool:
    count = len(re.findall(rf"\b{re.escape(keyword)}\b", response, re.IGNORECASE))
    return _within(count, min_count, max_count)


@register("paragraph_count")
def paragraph_count(response: str, count: int, separator: str = "\n\n") -> bool:
    """IFEval separates paragraphs with ``***``; plain blank lines are the default here."""
    pattern = r"\n\s*\n" if separator == "\n\n" else re.escape(separator)
    return len([p for p in re.split(pattern, response) if p.strip()]) == count


@register("bullet_count")
def bullet_count(response: str, count: int) -> bool:
    bullets = re.findall(r"^\s*(?:[*\-•]|\d+[.)])\s+\S", response, re.MULTILINE)
    return len(bullets) == count


@register("json_format")
def json_format(response: str) -> bool:
    """The whole response parses as JSON (a surrounding ```json fence is allowed)."""
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", response.strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@register("all_lowercase")
def all_lowercase(response: str) -> bool:
    return response == response.lower()


@register("all_uppercase")
def all_uppercase(response: str) -> bool:
    return response == response.upper()


@register("ends_with")
def ends_with(response: str, phrase: str) -> bool:
    return response.strip().endswith(phrase.strip())


@register("starts_with")
def starts_with(response: str, phrase: str) -> bool:
    return response.strip().startswith(phrase.strip())


@register("wrapped_in_quotes")
def wrapped_in_quotes(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == text[-1] == '"'


@register("no_commas")
def no_commas(response: str) -> bool:
    return "," not in response


@register("placeholder_count")
def placeholder_count(response: str, min_count: int) -> bool:
    return len(re.findall(r"\[[^\[\]]+\]", response)) >= min_count


@register("has_title")
def has_title(response: str) -> bool:
    """A title in double angular brackets, e.g. <<poem of joy>>."""
    return re.search(r"<<[^\n]+>>", response) is not None


@register("postscript")
def postscript(response: str, marker: str = "P.S.") -> bool:
    return re.search(rf"^\s*{re.escape(marker)}", response, re.MULTILINE | re.IGNORECASE) is not None


@register("highlighted_sections")
def highlighted_sections(response: str, min_count: int) -> bool:
    """Markdown highlights such as *highlighted section*."""
    return len(re.findall(r"\*[^\n*]+\*", response)) >= min_count


def unavailable(name: str) -> str | None:
    """Why a registered checker cannot run here (missing lm-eval or NLTK data), or None."""
    return ifeval.unavailable(name) if name in ifeval.IFEVAL_CHECKERS else None


for _name, _checker in {**IFBENCH_CHECKERS, **ifeval.IFEVAL_CHECKERS}.items():
    register(_name)(_checker)
