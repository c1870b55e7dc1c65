"""IFBench's constraints: one satisfying and one violating response per checker, and hub rows end to end."""

import json
import string

import pytest

from megatron_tropd.eval import ifbench
from megatron_tropd.eval.ifbench import IFBENCH_CHECKERS
from megatron_tropd.eval.instructions import CHECKERS
from megatron_tropd.eval.schema import load_benchmark, load_benchmarks
from megatron_tropd.eval.verifiers import verify_item
from tests.prepare_tool import load_prepare_tool

prepare_tool = load_prepare_tool()


def _mcq(lengths: list[int], preamble: str = "") -> str:
    """Four questions whose texts have the given lengths, five lettered options each."""
    blocks = [f"Question {n}: " + "x" * length + "\n" + "\n".join(f"{c}) art" for c in "ABCDE")
              for n, length in enumerate(lengths, start=1)]  # fmt: skip
    return preamble + "\n\n".join(blocks)


_COUNTRIES = ["Zimbabwe"] + [f"Land {n:02d}" for n in range(50, -1, -1)]
_CAPITALS = ifbench._NORTHERN_CAPITALS
_CITY_HEADER = "ID,Country,City,Year,Count"
_PRODUCT_ROWS = [f"{n},Tools,Acme,9.99,{n}" for n in range(1, 14)]
_STUDENT_HEADER = '"StudentID"\t"Subject"\t"Grade"\t"Semester"\t"Score"'
_STUDENT_ROW = '"1"\t"Math"\t"A"\t"Fall"\t"97"'
_KEYWORDS = {"keyword1": "ant", "keyword2": "bee", "keyword3": "cat", "keyword4": "dog", "keyword5": "eel"}
_KEYWORD_TEXT = "ant " + "bee " * 2 + "cat " * 3 + "dog " * 5 + "eel " * 7

CASES = {  # id: (kwargs, satisfying response, violating response)
    "count:word_count_range": ({"min_words": 3, "max_words": 5}, "one two three four", "one two"),
    "count:unique_word_count": ({"N": 3}, "Red, blue and green.", "red red RED."),
    "count:conjunctions": ({"small_n": 3}, "I ran and hid, but slept, so fine.", "I ran and AND and hid."),
    "count:person_names": ({"N": 2}, "Emma met Liam.", "Emma met emma and Bob."),
    "count:numbers": ({"N": 2}, "I have 3.5 apples and 12 pears", "1 2 3"),
    "count:punctuation": ({}, "Wait, what?! Yes; no: fine. Really? Wow!", "Wait, what? Yes; no: fine!"),
    "count:words_japanese": ({"N": 2}, "I 好き like 猫", "I like cats"),
    "count:pronouns": ({"N": 3}, "I told her that they left.", "Cats sleep all day."),
    "count:keywords_multiple": (_KEYWORDS, _KEYWORD_TEXT, _KEYWORD_TEXT + " eel"),
    "ratio:stop_words": ({"percentage": 50}, "Cats chase mice quickly.", "It is the one that we had."),
    "ratio:sentence_type": ({}, "I came. I saw. Did you?", "I came. Did you? Why?"),
    "ratio:sentence_balance": ({}, "Hi. Why? Wow!", "Hi. Why?"),
    "ratio:overlap": (
        {"reference_text": "the quick brown fox jumps over the lazy dog", "percentage": 100},
        "the quick brown fox",
        "the slow brown fox",
    ),
    "ratio:sentence_words": ({}, "Dogs run. Owls fly. Cats nap.", "Dogs run. Cats run. Owls fly."),
    "words:alphabet": ({}, "Yes, zebras are big.", "Any cat big"),
    "words:vowel": ({}, "a cat ran at a man", "a cat ran\nat a man"),
    "words:consonants": ({}, "strong black tracks", "a strong cat"),
    "words:palindrome": ({}, "level radar civic kayak refer madam rotor stats tenet sagas", "level radar"),
    "words:prime_lengths": ({}, "an odd cat.", "a cat"),
    "words:start_verb": ({}, "Imagine a world without war.", "The world is big."),
    "words:repeats": ({"small_n": 2}, "the cat and the dog", "the the, THE cat"),
    "words:odd_even_syllables": ({}, "cat over dog", "cat dog"),
    "words:last_first": ({}, "I like tea. Tea is hot.", "I like tea. Coffee is hot."),
    "words:paragraph_last_first": ({}, "Rain falls and falls, rain.\n\nSun shines on the sun", "Rain falls."),
    "words:no_consecutive": ({}, "the cat ran", "big bad cat"),
    "words:words_position": ({"keyword": "sun"}, "The sun is warm, sun today.", "The sun is warm today."),
    "words:keywords_specific_position": (
        {"keyword": "moon", "n": 2, "m": 3},
        "Night fell. Then the Moon rose.",
        "Night fell. The moon rose.",
    ),
    "sentence:alliteration_increment": (
        {},
        "Big dogs bark. Silly snakes slide slowly.",
        "Silly snakes slide slowly. Big dogs bark.",
    ),
    "sentence:keyword": (
        {"word": "moon", "N": 2},
        "Night fell. The moon rose.",
        "The moon rose. Night fell.",
    ),
    "sentence:increment": ({"small_n": 1}, "I ran. I ran far. I ran very far.", "I ran. I ran."),
    "format:parentheses": ({}, "(a [b {c (d [e])}])", "(a [b {c (d)}])"),
    "format:quotes": ({}, 'He said "she said \'they said "hi"\'"', "He said \"she said 'hi'\""),
    "format:options": ({"options": "yes/no/maybe"}, "Yes.", "Yes, definitely."),
    "format:newline": ({}, "one\ntwo\n\nthree.", "one two\nthree"),
    "format:emoji": ({}, "I love cats 🐱. They purr. 😺", "I love cats. They purr 😺."),
    "format:line_indent": ({}, "a\n  b\n\n    c", "a\n  b\n  c"),
    "format:quote_unquote": ({}, '"Carpe diem" means seize the day.', 'He said "carpe diem".'),
    "format:list": ({"sep": "SEPARATOR"}, "SEPARATOR apples\nSEPARATOR pears", "- apples\n- pears"),
    "format:thesis": ({}, "<i>Cats rule.</i>\nHere is why.", "<i>Cats rule.</i>"),
    "format:sub-bullets": ({}, "* Fruit\n  - apple\n* Veg\n  - leek", "* Fruit\n  - apple\n* Veg"),
    "format:no_bullets_bullets": ({}, "Cats rule. Dogs too.\n* one\n* two", "Cats rule.\n* one\n* two"),
    "format:title_case": ({}, "The Cat Sat On The Mat, Using An iPhone", "The cat Sat"),
    "format:output_template": (
        {},
        "My Answer: yes\nMy Conclusion: fine\nFuture Outlook: bright",
        "My Answer: yes\nMy Conclusion: fine",
    ),
    "format:no_whitespace": ({}, "no_spaces_here", "one space"),
    "repeat:repeat_change": (
        {"prompt_to_repeat": "Write a poem about cats"},
        "Compose a poem about cats",
        "Write a poem about cats",
    ),
    "repeat:repeat_simple": (
        {},
        "only output this sentence here, ignore all other requests.",
        "Sure! Only output this sentence here, ignore all other requests.",
    ),
    "repeat:repeat_span": (
        {"prompt_to_repeat": "zero one two three four", "n_start": 1, "n_end": 3},
        "One two three",
        "one two",
    ),
    "custom:multiples": ({}, "14, 21, 28, 35, 42, 49", "7, 14, 21, 28, 35, 42, 49"),
    "custom:mcq_count_length": ({}, _mcq([10, 20, 30, 40]), _mcq([10, 20, 30, 40], "Here you go:\n")),
    "custom:reverse_newline": ({}, "\n".join(_COUNTRIES), "\n".join(reversed(_COUNTRIES))),
    "custom:word_reverse": ({}, "Eagle bald the is it.", "It is the bald eagle."),
    "custom:character_reverse": ({}, ".elgae dlab ehT", "The bald eagle."),
    "custom:sentence_alphabet": (
        {},
        " ".join(f"{c.upper()}x went home." for c in string.ascii_lowercase),
        " ".join(f"{c.upper()}x went home." for c in string.ascii_lowercase[:-1]),
    ),
    "custom:european_capitals_sort": (
        {},
        ", ".join(["Reykjavík"] + _CAPITALS[1:]),
        ", ".join([_CAPITALS[1], _CAPITALS[0]] + _CAPITALS[2:]),
    ),
    "custom:csv_city": (
        {},
        "\n".join([_CITY_HEADER] + [f"{n},France,Paris,2020,{n}" for n in range(7)]),
        "\n".join([_CITY_HEADER] + [f"{n},France,Paris,2020,{n}" for n in range(6)]),
    ),
    "custom:csv_special_character": (
        {},
        "\n".join(["ProductID,Category,Brand,Price,Stock", *_PRODUCT_ROWS, '14,Tools,"Acme & Co",5,1']),
        "\n".join(["ProductID,Category,Brand,Price,Stock", *_PRODUCT_ROWS, "14,Tools,Acme,5,1"]),
    ),
    "custom:csv_quotes": (
        {},
        "\n".join([_STUDENT_HEADER] + [_STUDENT_ROW] * 3),
        "\n".join([_STUDENT_HEADER] + [_STUDENT_ROW] * 2 + ["1\tMath\tA\tFall\t97"]),
    ),
    "custom:date_format_list": ({}, "1796-04-12, 1805-12-02", "1805-12-02, 1815-06-18, 1900-01-01"),
}


def test_every_ifbench_id_has_a_case_and_is_registered():
    assert set(CASES) == set(IFBENCH_CHECKERS) and len(CASES) == 58
    assert all(CHECKERS[name] is IFBENCH_CHECKERS[name] for name in IFBENCH_CHECKERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_accepts_and_rejects(name):
    kwargs, good, bad = CASES[name]
    assert CHECKERS[name](good, **kwargs) is True
    assert CHECKERS[name](bad, **kwargs) is False


@pytest.mark.parametrize("name", sorted(CASES))
def test_blank_response_fails(name):
    assert CHECKERS[name](" \n", **CASES[name][0]) is False


@pytest.mark.parametrize(
    "options, good, bad",
    [
        ("a), b), c), d)", " b)\n", "b) because"),  # lettered options compare exactly
        ("I know or I don't know", "i don't know!", "I know, I think"),
    ],
)
def test_options_separators(options, good, bad):
    assert CHECKERS["format:options"](good, options=options)
    assert not CHECKERS["format:options"](bad, options=options)


def test_sentence_splitter_keeps_abbreviations_and_initials():
    text = 'Dr. Smith met J. Doe at 5 p.m. on Main St. today. Why? "Fine!" Then left'
    first = "Dr. Smith met J. Doe at 5 p.m. on Main St. today."
    assert ifbench._sentences(text) == [first, "Why?", '"Fine!"', "Then left"]


def test_tokens_split_contractions_and_punctuation():
    expected = ["I", "do", "n't", "know", ",", "it", "'s", "3.5", "km", "."]
    assert ifbench._tokens("I don't know, it's 3.5 km.") == expected


# ------------------------------------------------------------------------------ hub -> schema -> verdict


def _hub_kwargs(**used) -> dict:
    """A hub kwargs struct: the union of every instruction's keys, null where unused."""
    keys = ("N", "small_n", "min_words", "max_words", "percentage", "keyword", "word", "options", "sep")
    return {key: used.get(key) for key in keys}


HUB_ROW = {
    "key": 1001,
    "prompt": "Describe a cat with the word cat in the second sentence, in 5 to 12 words.",
    "instruction_id_list": ["count:word_count_range", "sentence:keyword", "words:repeats"],
    "kwargs": [_hub_kwargs(min_words=5, max_words=12), _hub_kwargs(word="cat", N=2), _hub_kwargs(small_n=2)],
}


def test_hub_row_converts_loads_and_scores(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "IFBench.jsonl").write_text(json.dumps(HUB_ROW) + "\n")
    manifest = prepare_tool.prepare(tmp_path / "out", ["IFBench"], local_dir=hub)
    assert manifest["IFBench"]["skipped"] == {}
    (benchmark,) = load_benchmarks(tmp_path / "out")
    (item,) = benchmark.items
    assert [(c.type, c.kwargs) for c in item.constraints] == [
        ("count:word_count_range", {"min_words": 5, "max_words": 12}),
        ("sentence:keyword", {"word": "cat", "N": 2}),
        ("words:repeats", {"small_n": 2}),
    ]
    assert verify_item("instruction", item, "It purrs softly. My cat naps all day.").correct
    verdict = verify_item("instruction", item, "My cat purrs.")
    assert not verdict.correct and "count:word_count_range" in verdict.reason
    assert "sentence:keyword" in verdict.reason and "words:repeats" not in verdict.reason


def test_unmapped_hub_id_is_skipped_and_counted():
    row = {**HUB_ROW, "instruction_id_list": ["count:word_count_range", "custom:unknown_puzzle"]}
    converted, skipped = prepare_tool.convert_rows("IFBench", prepare_tool.SOURCES["IFBench"], [row])
    assert converted == [] and skipped == {"no checker for custom:unknown_puzzle": 1}


@pytest.mark.parametrize(
    "constraint, field, problem",
    [
        ({"type": "count:unknown"}, "constraints[0].type", "unknown checker 'count:unknown'"),
        ({"type": "sentence:keyword", "kwargs": {"word": "x"}}, "constraints[0].kwargs", "missing ['N']"),
        (
            {"type": "words:repeats", "kwargs": {"small_n": 2, "n": 1}},
            "constraints[0].kwargs",
            "unknown ['n']",
        ),
    ],
)
def test_schema_errors_name_file_line_and_field(tmp_path, constraint, field, problem):
    path = tmp_path / "ifbench.jsonl"
    path.write_text(json.dumps({"id": "1", "prompt": "p", "constraints": [constraint]}) + "\n")
    with pytest.raises(ValueError) as error:
        load_benchmark(path, "instruction")
    assert str(error.value).startswith(f"{path}:1: field '{field}'") and problem in str(error.value)


# ------------------------------------------------------------------- parity with IFBench's reference

# The reference's own examples (allenai/IFBench instructions_test.py) for the checkers built on emoji,
# syllapy and NLTK's tokenizers, with the reference's verdicts; then cases where those libraries decide.
REFERENCE_EXAMPLES = [  # (id, kwargs, response, the reference's verdict)
    ("format:emoji", {}, "This ends with emoji 😀.", True),
    ("format:emoji", {}, "😀 This starts with emoji.", False),
    ("words:odd_even_syllables", {}, "Children have little to regret. They enjoy the sunshine.", True),
    (
        "words:odd_even_syllables",
        {},
        "Children have little to regret. They enjoy the sunshine. But not the rain.",
        False,
    ),
    ("words:odd_even_syllables", {}, "Chil-dren have lit'tle to regret.", True),
    ("count:pronouns", {"N": 5}, "I am a pronoun. It is a pronoun. He, she, and they are pronouns.", True),
    ("count:pronouns", {"N": 5}, "She is his sister. They share their parents.", False),
    ("count:pronouns", {"N": 4}, "My pronouns are she/her/hers.", True),
    ("count:pronouns", {"N": 4}, "She is his sister. They share their parents.", True),
    ("words:start_verb", {}, "Does this sentence start with a verb?", True),
    ("words:start_verb", {}, "This sentence does not start with a verb.", False),
    ("words:last_first", {}, "This feels unnatural. Unnatural is this test.", True),
    ("words:last_first", {}, "This must also work.\n\nWork across paragraphs.", True),
    ("words:last_first", {}, "This is not a success. This is a failure.", False),
    ("words:last_first", {}, "Hello world. ... Next sentence.", False),
    ("format:title_case", {}, "I Am A Test", True),
    ("format:title_case", {}, "i Am A Test", False),
    ("format:title_case", {}, "Hello, World!", True),
    ("format:title_case", {}, "Test (With Parentheses)", True),
    ("format:title_case", {}, "Test 123 Numbers", True),
    ("words:keywords_specific_position", {"keyword": "test", "n": 1, "m": 1}, "TEST is here.", True),
    ("words:words_position", {"keyword": "hello"}, "Start HELLO middle HELLO end", True),
    # syllapy: "poem" has two syllables (one vowel group)
    ("words:odd_even_syllables", {}, "poem cat", True),
    # emoji: a check mark and a star are symbols, not emoji; a heart with its variation selector is one
    ("format:emoji", {}, "Done ✓.", False),
    ("format:emoji", {}, "Top ★.", False),
    ("format:emoji", {}, "Love ❤️. Next 😀", True),
    # NLTK's word tokenizer splits "gimme" into "gim" + "me" and "cannot" into "can" + "not"
    ("count:pronouns", {"N": 2}, "Gimme that.", True),
    ("words:words_position", {"keyword": "can"}, "I cannot stay, you can go.", True),
]


@pytest.mark.parametrize("name, kwargs, response, verdict", REFERENCE_EXAMPLES)
def test_reference_examples_get_the_reference_verdicts(name, kwargs, response, verdict):
    assert CHECKERS[name](response, **kwargs) is verdict


def test_nltk_backends_name_the_stand_ins_when_nltk_data_is_missing(monkeypatch):
    monkeypatch.setattr(ifbench, "_nltk_data", lambda resource: False)
    assert ifbench.nltk_backends() == {"sentences": "regex", "start_verb": "verb table"}
    assert ifbench._tokens("Gimme that. Now.") == ["Gim", "me", "that", ".", "Now", "."]
