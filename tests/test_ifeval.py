"""IFEval ids are scored by lm-eval's own IFEval checkers: the project's strict and loose verdicts equal
lm-eval's ``test_instruction_following_strict`` / ``_loose`` on cases covering every id in its registry."""

import inspect

import pytest

from megatron_tropd.eval import ifeval
from megatron_tropd.eval.schema import Constraint, Item, parse_item
from megatron_tropd.eval.verifiers import verify_instructions

pytest.importorskip("lm_eval")
pytest.importorskip("langdetect")  # lm-eval's [ifeval] extra
REGISTRY = ifeval._registry()  # imports lm-eval's IFEval module without its punkt download
from lm_eval.tasks.ifeval import utils as lm_utils  # noqa: E402

PROMPT = "Write a poem"
CASES = [  # (response, instruction id, kwargs)
    (
        "I LOVE NASA and the USA.",
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
    ),
    (
        "HELLO WORLD, THIS IS A LONG ENOUGH TEST OF ENGLISH CAPITAL LETTERS.",
        "change_case:english_capital",
        {},
    ),
    (
        "Sure:\nHELLO WORLD, THIS IS A LONG ENOUGH TEST OF ENGLISH CAPITAL LETTERS.",
        "change_case:english_capital",
        {},
    ),
    (
        "the quick brown fox jumps over the lazy dog and keeps on running home.",
        "change_case:english_lowercase",
        {},
    ),
    ("Write a poem\nRoses are red.", "combination:repeat_prompt", {"prompt_to_repeat": PROMPT}),
    ("Roses are red.\nWrite a poem", "combination:repeat_prompt", {"prompt_to_repeat": PROMPT}),
    ("First answer.\n******\nSecond answer.", "combination:two_responses", {}),
    ("Dear [name], we live at [address].", "detectable_content:number_placeholders", {"num_placeholders": 2}),
    ("Dear [name].", "detectable_content:number_placeholders", {"num_placeholders": 2}),
    ("Hello there.\nP.S. see you soon", "detectable_content:postscript", {"postscript_marker": "P.S."}),
    ("Hello there. P.P.S later", "detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("My answer is yes.", "detectable_format:constrained_response", {}),
    ("I think so.", "detectable_format:constrained_response", {}),
    ('```json\n{"a": 1}\n```', "detectable_format:json_format", {}),
    ('Here you go:\n{"a": 1}', "detectable_format:json_format", {}),
    (
        "SECTION 1\nfoo\nSECTION 2\nbar",
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
    ),
    ("* one\n* two", "detectable_format:number_bullet_lists", {"num_bullets": 2}),
    ("* one\n- two\n* three", "detectable_format:number_bullet_lists", {"num_bullets": 2}),
    ("*one* and **two**", "detectable_format:number_highlighted_sections", {"num_highlights": 2}),
    ("<<My Title>>\ntext", "detectable_format:title", {}),
    ("<<>> no title", "detectable_format:title", {}),
    ("The Cat and the dog.", "keywords:existence", {"keywords": ["cat", "dog"]}),
    ("This is good, not badly done.", "keywords:forbidden_words", {"forbidden_words": ["bad"]}),
    ("This is bad.", "keywords:forbidden_words", {"forbidden_words": ["bad"]}),
    (
        "Rain, rain, go away.",
        "keywords:frequency",
        {"keyword": "rain", "frequency": 2, "relation": "at least"},
    ),
    (
        "Rain, rain, go away.",
        "keywords:frequency",
        {"keyword": "rain", "frequency": 2, "relation": "less than"},
    ),
    (
        "Zebras zigzag.",
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
    ),
    (
        "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans.",
        "language:response_language",
        {"language": "fr"},
    ),
    (
        "Hello, my name is Marie and I have lived in Paris for ten years.",
        "language:response_language",
        {"language": "fr"},
    ),
    (
        "First part.\n\nThen more.",
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
    ),
    ("one\n***\ntwo", "length_constraints:number_paragraphs", {"num_paragraphs": 2}),
    ("one\n\ntwo", "length_constraints:number_paragraphs", {"num_paragraphs": 2}),
    (
        "Dr. Smith arrived. He sat down.",
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
    ),
    ("I don't know it.", "length_constraints:number_words", {"num_words": 5, "relation": "less than"}),
    ("I don't know it.", "length_constraints:number_words", {"num_words": 5, "relation": "at least"}),
    ("No commas here.", "punctuation:no_comma", {}),
    ("Hi. Any other questions?", "startend:end_checker", {"end_phrase": "Any other questions?"}),
    ("Hi. **Any other questions?**", "startend:end_checker", {"end_phrase": "Any other questions?"}),
    ('"quoted"', "startend:quotation", {}),
    ('Sure! Here it is:\n"quoted"', "startend:quotation", {}),
    ("   ", "punctuation:no_comma", {}),
]


def _lm_eval_verdicts(response: str, instruction_id: str, kwargs: dict) -> tuple[bool, bool]:
    example = lm_utils.InputExample(
        key=0, instruction_id_list=[instruction_id], prompt=PROMPT, kwargs=[kwargs]
    )
    strict = lm_utils.test_instruction_following_strict(example, response).follow_all_instructions
    return strict, lm_utils.test_instruction_following_loose(example, response).follow_all_instructions


def test_cases_cover_every_lm_eval_instruction_id():
    assert {case[1] for case in CASES} == set(REGISTRY) == set(ifeval.IFEVAL_CHECKERS)


def test_keyword_names_are_lm_evals():
    for name, cls in REGISTRY.items():
        assert ifeval.IFEVAL_KWARGS[name] == tuple(inspect.signature(cls.build_description).parameters)[1:]


@pytest.mark.parametrize("response, instruction_id, kwargs", CASES)
def test_verdicts_equal_lm_evals(response, instruction_id, kwargs):
    if ifeval.unavailable(instruction_id):
        pytest.skip(ifeval.unavailable(instruction_id))
    item = Item("i", PROMPT, constraints=(Constraint(instruction_id, kwargs),))
    ours = (
        verify_instructions(response, item).correct,
        verify_instructions(response, item, loose=True).correct,
    )
    assert ours == _lm_eval_verdicts(response, instruction_id, kwargs)


def test_strict_and_loose_both_occur():
    verdicts = [_lm_eval_verdicts(*case) for case in CASES if not ifeval.unavailable(case[1])]
    assert {(True, True), (False, True), (False, False)} <= set(verdicts)


def test_benchmark_rows_with_ifeval_ids_load():
    row = {"id": "x", "prompt": "p", "constraints": [{"type": "startend:quotation", "kwargs": {}}]}
    assert parse_item(row, "instruction").constraints[0].type == "startend:quotation"


def test_ids_needing_punkt_are_refused_at_load_time_without_it(monkeypatch):
    monkeypatch.setattr(ifeval, "_has_punkt", lambda: False)
    constraint = {"type": "length_constraints:number_sentences", "kwargs": {"num_sentences": 2}}
    with pytest.raises(ValueError, match="punkt_tab"):
        parse_item({"id": "x", "prompt": "p", "constraints": [constraint]}, "instruction")
