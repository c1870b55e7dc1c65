"""IFEval's instructions under their IFEval ids, scored by lm-eval's own checkers (``lm_eval.tasks.ifeval``).

A constraint ``{"type": "length_constraints:number_words", "kwargs": {"num_words": 300, "relation":
"less than"}}`` is checked as lm-eval checks it: falsy kwargs dropped, ``build_description(**kwargs)``,
then ``check_following(response)``; a blank response fails. The keyword names are listed here so benchmark
files validate without importing lm-eval; lm-eval (the ``lmeval`` extra, with ``langdetect`` and
``immutabledict``) is imported on first use.

``length_constraints:number_sentences`` and ``change_case:capital_word_frequency`` need NLTK's punkt data
(``python -m nltk.downloader punkt_tab``), which no PyPI package provides and which cannot be
downloaded while evaluating offline: without it a benchmark using them is refused at load time.
lm-eval tries to download punkt when its IFEval module is imported; that download is skipped here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

IFEVAL_KWARGS: dict[str, tuple[str, ...]] = {
    "change_case:capital_word_frequency": ("capital_frequency", "capital_relation"),
    "change_case:english_capital": (),
    "change_case:english_lowercase": (),
    "combination:repeat_prompt": ("prompt_to_repeat",),
    "combination:two_responses": (),
    "detectable_content:number_placeholders": ("num_placeholders",),
    "detectable_content:postscript": ("postscript_marker",),
    "detectable_format:constrained_response": (),
    "detectable_format:json_format": (),
    "detectable_format:multiple_sections": ("section_spliter", "num_sections"),
    "detectable_format:number_bullet_lists": ("num_bullets",),
    "detectable_format:number_highlighted_sections": ("num_highlights",),
    "detectable_format:title": (),
    "keywords:existence": ("keywords",),
    "keywords:forbidden_words": ("forbidden_words",),
    "keywords:frequency": ("keyword", "frequency", "relation"),
    "keywords:letter_frequency": ("letter", "let_frequency", "let_relation"),
    "language:response_language": ("language",),
    "length_constraints:nth_paragraph_first_word": ("num_paragraphs", "nth_paragraph", "first_word"),
    "length_constraints:number_paragraphs": ("num_paragraphs",),
    "length_constraints:number_sentences": ("num_sentences", "relation"),
    "length_constraints:number_words": ("num_words", "relation"),
    "punctuation:no_comma": (),
    "startend:end_checker": ("end_phrase",),
    "startend:quotation": (),
}
NEEDS_PUNKT = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
_INSTALL = "IFEval ids are scored by lm-eval's IFEval checkers: pip install 'megatron-tropd[lmeval]'"


@contextlib.contextmanager
def _no_downloads(nltk):
    download, nltk.download = nltk.download, lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = download


@functools.cache
def _registry() -> dict[str, type]:
    try:
        import nltk

        with _no_downloads(nltk):
            from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
        import langdetect
    except ImportError as error:
        raise ImportError(f"{_INSTALL} ({error})") from error
    langdetect.DetectorFactory.seed = 0  # langdetect samples at random: fixed, verdicts are repeatable
    return INSTRUCTION_DICT


def _has_punkt() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def unavailable(instruction_id: str) -> str | None:
    """Why this IFEval id cannot be scored here, or None when it can."""
    try:
        _registry()
    except ImportError as error:
        return str(error)
    if instruction_id in NEEDS_PUNKT and not _has_punkt():
        return (
            f"{instruction_id} needs NLTK's punkt data (python -m nltk.downloader punkt_tab), "
            "which is not installed; install it or score IFEval with lm-eval (`lm_eval --tasks ifeval`)"
        )
    return None


def check(instruction_id: str, response: str, **kwargs) -> bool:
    """lm-eval's strict verdict for one instruction on one response."""
    instruction = _registry()[instruction_id](instruction_id)
    instruction.build_description(**{key: value for key, value in kwargs.items() if value})
    return bool(response.strip()) and bool(instruction.check_following(response))


def _checker(instruction_id: str) -> Callable[..., bool]:
    def checker(response: str, **kwargs) -> bool:
        return check(instruction_id, response, **kwargs)

    response = inspect.Parameter("response", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    keywords = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in IFEVAL_KWARGS[instruction_id]
    ]
    checker.__signature__ = inspect.Signature([response, *keywords])
    checker.__name__ = checker.__qualname__ = instruction_id.replace(":", "_")
    return checker


IFEVAL_CHECKERS: dict[str, Callable[..., bool]] = {name: _checker(name) for name in IFEVAL_KWARGS}
