"""Evaluation side: schema validation, verifiers, avg@k / pass@k, hub conversion and the end-to-end report."""

import json
import math
from pathlib import Path

import pytest

from megatron_tropd.eval import verifiers
from megatron_tropd.eval.ifbench import IFBENCH_CHECKERS
from megatron_tropd.eval.ifeval import IFEVAL_CHECKERS
from megatron_tropd.eval.instructions import CHECKERS
from megatron_tropd.eval.sandbox import SandboxLimits
from megatron_tropd.eval.schema import CodeTest, Constraint, Item, load_benchmark, load_benchmarks
from megatron_tropd.eval.scoring import (
    avg_at_k,
    evaluate,
    markdown_table,
    pass_at_k,
    pass_at_k_one,
    render_prompt,
    write_report,
)
from megatron_tropd.eval.verifiers import (
    extract_boxed,
    extract_choice,
    verify_code,
    verify_instructions,
    verify_item,
    verify_math,
    verify_multiple_choice,
)
from tests.prepare_tool import load_prepare_tool

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
CODE_LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_bytes=256 << 20)


prepare_tool = load_prepare_tool()

# ---------------------------------------------------------------------------------------------- math


@pytest.fixture(params=["math-verify", "sympy"])
def math_backend(request, monkeypatch):
    """Run each math case with math-verify and with the sympy fallback."""
    if request.param == "sympy":
        monkeypatch.setattr(verifiers, "math_verify", None)
    elif verifiers.math_verify is None:
        pytest.skip("math-verify not installed")
    return request.param


@pytest.mark.parametrize(
    "response, answer",
    [
        ("so the result is \\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{1/2}", "\\dfrac{1}{2}"),
        ("The final answer is 1/2", "0.5"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2"),
        ("\\boxed{070}", "70"),
        ("\\boxed{x + 1}", "1 + x"),
        ("first \\boxed{3}, corrected: \\boxed{4}", "4"),
    ],
)
def test_math_equivalent_forms_are_correct(math_backend, response, answer):
    assert verify_math(response, answer).correct


@pytest.mark.parametrize(
    "response, answer, reason",
    [
        ("\\boxed{3}", "1/2", "!= reference"),
        ("\\boxed{0.05}", "0.5", "!= reference"),
        ("I think it is one half.", "1/2", "no final answer"),  # missing box
        ("\\boxed{\\frac{1}{2}", "1/2", "no final answer"),  # unbalanced (truncated) box
        ("\\boxed{exit()}", "2", "!= reference"),  # never evaluated as Python
    ],
)
def test_math_wrong_or_malformed_answers_fail(math_backend, response, answer, reason):
    verdict = verify_math(response, answer)
    assert not verdict.correct
    assert reason in verdict.reason


def test_extract_boxed_handles_nesting():
    assert extract_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert extract_boxed("no box") is None


# ----------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "response, letter",
    [
        ("Reasoning...\nAnswer: C", "C"),
        ("I pick (B).", "B"),
        ("\\boxed{D}", "D"),
        ("A", "A"),
        ("the answer is (b)", "B"),
        ("(A) looks wrong, so the answer is C", "C"),
        ("**Answer:** B", "B"),
        ("The answer is: \\boxed{\\text{A}}", "A"),
        ("the answer is a little unclear; I go with (D)", "D"),
    ],
)
def test_choice_extraction(response, letter):
    assert extract_choice(response, num_options=4) == letter


def test_choice_failures_have_reasons():
    assert verify_multiple_choice("Answer: B", "C", 4).reason == "chose B, answer is C"
    assert not verify_multiple_choice("I am not sure", "C", 4).correct
    assert extract_choice("Answer: E", num_options=4) is None  # out of range letter


# ------------------------------------------------------------------------------------- instructions

CHECKER_CASES = {  # type: (kwargs, passing response, failing response)
    "word_count": ({"min_words": 2, "max_words": 4}, "three small words", "one"),
    "sentence_count": ({"max_sentences": 1}, "One sentence.", "One. Two."),
    "include_keywords": ({"keywords": ["Umbrella", "rain"]}, "rain needs an umbrella", "sunny day"),
    "forbidden_words": ({"words": ["bad"]}, "a badge is fine", "this is Bad"),
    "keyword_frequency": ({"keyword": "cat", "min_count": 2}, "cat and cat", "one cat"),
    "paragraph_count": ({"count": 2}, "first\n\nsecond", "only one"),
    "bullet_count": ({"count": 2}, "* a\n* b", "* a"),
    "json_format": ({}, '```json\n{"a": 1}\n```', "{a: 1}"),
    "all_lowercase": ({}, "all lower", "Not lower"),
    "all_uppercase": ({}, "ALL UPPER", "Not upper"),
    "ends_with": ({"phrase": "Any questions?"}, "Done. Any questions?", "Any questions? Done."),
    "starts_with": ({"phrase": "Dear"}, "Dear team", "Hello team"),
    "wrapped_in_quotes": ({}, '"quoted"', "not quoted"),
    "no_commas": ({}, "no commas here", "a, b"),
    "placeholder_count": ({"min_count": 2}, "[name] at [address]", "[name] only"),
    "has_title": ({}, "<<My Title>>\ntext", "no title"),
    "postscript": ({"marker": "P.S."}, "text\nP.S. bye", "no postscript"),
    "highlighted_sections": ({"min_count": 1}, "an *important* part", "plain"),
}


def test_every_checker_has_a_case():  # IFBench's and IFEval's have theirs in test_ifbench/test_ifeval
    assert set(CHECKER_CASES) == set(CHECKERS) - set(IFBENCH_CHECKERS) - set(IFEVAL_CHECKERS)


@pytest.mark.parametrize("name", sorted(CHECKER_CASES))
def test_checker_accepts_and_rejects(name):
    kwargs, good, bad = CHECKER_CASES[name]
    assert CHECKERS[name](good, **kwargs)
    assert not CHECKERS[name](bad, **kwargs)


def test_instruction_verdict_names_failed_constraints():
    item = Item("i", "p", constraints=(Constraint("all_lowercase"), Constraint("no_commas")))
    verdict = verify_item("instruction", item, "hello, world")
    assert not verdict.correct
    assert "no_commas" in verdict.reason and "all_lowercase" not in verdict.reason


def test_verifier_crash_is_a_failure_with_reason():
    item = Item("i", "p", constraints=(Constraint("word_count", {"bogus": 1}),))  # bypasses the schema
    verdict = verify_item("instruction", item, "text")
    assert not verdict.correct
    assert verdict.reason.startswith("verifier error: TypeError")


# --------------------------------------------------------------------------------------------- code

SUM_ITEM = Item("sum", "p", tests=(CodeTest("1 2\n", "3\n"), CodeTest("5 7\n", "12")))


def test_code_correct_program_passes():
    response = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert verify_code(response, SUM_ITEM, CODE_LIMITS).correct


@pytest.mark.parametrize(
    "response, reason",
    [
        ("```python\nprint(3)\n```", "test 1: wrong output"),
        ("print(a + b) without a fence", "no fenced code block"),
        ("```python\nraise SystemExit(2)\n```", "test 0: wrong output"),  # LCB grades the output
    ],
)
def test_code_failures_have_reasons(response, reason):
    verdict = verify_code(response, SUM_ITEM, CODE_LIMITS)
    assert not verdict.correct
    assert reason in verdict.reason


def test_code_function_entry_point():
    item = Item("f", "p", tests=(CodeTest("[1, 2, 3]", "6"), CodeTest("[]", "0")), entry="total")
    # List is not imported: the prelude supplies typing names, as LiveCodeBench's harness does.
    response = "```python\nclass Solution:\n    def total(self, nums: List[int]) -> int:\n"
    response += "        return sum(nums)\n```"
    assert verify_code(response, item, CODE_LIMITS).correct


# ------------------------------------------------------------------------------------------- scoring


def test_avg_and_pass_at_k_on_hand_checkable_numbers():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 is avg@n
    assert pass_at_k(correct, 4) == pytest.approx(2 / 3)
    # n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert pass_at_k(correct, 2) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (32, 1, 8), (5, 5, 2), (7, 0, 3)])
def test_pass_at_k_matches_binomial_formula(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k_one(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_k_above_samples():
    with pytest.raises(ValueError, match="1 <= k"):
        pass_at_k_one(4, 1, 5)


# -------------------------------------------------------------------------------------------- schema


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROWS = {
    "math": {"id": "m1", "prompt": "1+1?", "answer": "2"},
    "code": {"id": "c1", "prompt": "echo", "tests": [{"input": "x\n", "output": "x\n"}]},
    "instruction": {"id": "i1", "prompt": "shout", "constraints": [{"type": "all_uppercase", "kwargs": {}}]},
    "multiple_choice": {"id": "q1", "question": "pick", "options": ["a", "b", "c"], "answer": "B"},
}


@pytest.mark.parametrize("family", sorted(GOOD_ROWS))
def test_schema_accepts_valid_rows(tmp_path, family):
    benchmark = load_benchmark(_write_lines(tmp_path / "b.jsonl", [GOOD_ROWS[family], ""]), family)
    assert benchmark.name == "b" and len(benchmark.items) == 1


@pytest.mark.parametrize(
    "family, bad_row, field, problem",
    [
        ("math", {"id": "m2", "prompt": "p"}, "answer", "missing"),
        ("math", {"id": 7, "prompt": "p", "answer": "1"}, "id", "expected str"),
        ("code", {"id": "c2", "prompt": "p", "tests": []}, "tests", "at least one"),
        ("code", {"id": "c2", "prompt": "p", "tests": [{"input": "1"}]}, "tests[0]", "expected"),
        (
            "instruction",
            {"id": "i2", "prompt": "p", "constraints": [{"type": "nope"}]},
            "constraints[0].type",
            "unknown checker",
        ),
        (
            "instruction",
            {"id": "i2", "prompt": "p", "constraints": [{"type": "word_count", "kwargs": {"n": 1}}]},
            "constraints[0].kwargs",
            "unknown ['n']",
        ),
        (
            "instruction",
            {"id": "i2", "prompt": "p", "constraints": [{"type": "ends_with"}]},
            "constraints[0].kwargs",
            "missing ['phrase']",
        ),
        (
            "multiple_choice",
            {"id": "q2", "question": "p", "options": ["a", "b"], "answer": "C"},
            "answer",
            "A..B",
        ),
        (
            "multiple_choice",
            {"id": "q2", "question": "p", "options": ["a"], "answer": "A"},
            "options",
            "2 to",
        ),
        ("math", "{not json", "<line>", "invalid JSON"),
        ("math", {"id": "m1", "prompt": "again", "answer": "3"}, "id", "duplicate"),
    ],
)
def test_schema_errors_name_file_line_and_field(tmp_path, family, bad_row, field, problem):
    path = _write_lines(tmp_path / "bench.jsonl", [GOOD_ROWS[family], "", bad_row])
    with pytest.raises(ValueError) as error:
        load_benchmark(path, family)
    message = str(error.value)
    assert message.startswith(f"{path}:3: field '{field}'"), message
    assert problem in message


def test_schema_rejects_unknown_family_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark family"):
        load_benchmark(tmp_path / "x.jsonl", "poetry")
    with pytest.raises(ValueError, match="no items"):
        load_benchmark(_write_lines(tmp_path / "empty.jsonl", [""]), "math")


# ------------------------------------------------------------------------------ hub -> schema (tool)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The seven benchmarks converted from the hub-shaped fixtures, as the tool writes them."""
    out = tmp_path_factory.mktemp("benchmarks")
    manifest = prepare_tool.prepare(out, list(prepare_tool.SOURCES), local_dir=FIXTURES / "hub")
    return out, manifest


def test_prepare_writes_every_benchmark_in_paper_order(prepared):
    out, manifest = prepared
    assert list(manifest) == ["AIME24", "AIME25", "AMC23", "GPQA-D", "MMLU-Redux", "IFBench", "LCB-v6"]
    benchmarks = load_benchmarks(out)  # every written line passes the schema
    assert [b.name for b in benchmarks] == list(manifest)


def test_prepare_field_mappings(prepared):
    out, manifest = prepared
    by_name = {b.name: b for b in load_benchmarks(out)}
    aime = by_name["AIME24"].items[1]
    assert (aime.id, aime.answer) == ("61", "\\frac{1}{2}")
    for item in by_name["GPQA-D"].items:  # the shuffled letter still points at the correct answer
        correct = {"recA": "Photon", "recB": "Na"}[item.id]
        assert item.options["ABCD".index(item.answer)] == correct
    mmlu = by_name["MMLU-Redux"]
    assert [i.id for i in mmlu.items] == ["anatomy-0", "astronomy-0"] and mmlu.items[0].answer == "C"
    assert manifest["MMLU-Redux"]["skipped"] == {"filtered": 1}
    assert manifest["IFBench"]["skipped"] == {"no checker for custom:no_such_checker": 1}
    assert manifest["IFBench"]["loose"] is True and by_name["IFBench"].loose  # the paper's IFBench score
    assert not any(b.loose for name, b in by_name.items() if name != "IFBench")
    word_limit = by_name["IFBench"].items[0].constraints[1]
    assert (word_limit.type, word_limit.kwargs) == (
        "length_constraints:number_words",
        {"num_words": 20, "relation": "less than"},
    )
    stdin_item, functional_item = by_name["LCB-v6"].items
    assert [t.output for t in stdin_item.tests] == ["3\n", "12\n"]  # public + decoded private
    assert functional_item.entry == "total" and "Starter code" in functional_item.prompt


def test_lcb_decoder_refuses_pickled_objects():
    import base64
    import pickle
    import zlib

    hostile = base64.b64encode(zlib.compress(pickle.dumps(Path("/etc")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        prepare_tool.decode_lcb_tests(hostile)


# ------------------------------------------------------------------------------------- end to end

INSTRUCTION_ANSWERS = {
    "1": "a small grey cat naps in the sun",
    "2": "I took my umbrella. Is there anything else?",
}
PROGRAMS = {
    "abc001_a": "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    "lc-1": "```python\nclass Solution:\n    def total(self, nums):\n        return sum(nums)\n```",
}


def _correct_response(benchmark, item) -> str:
    if benchmark.family == "math":
        return f"Reasoning... so the answer is \\boxed{{{item.answer}}}."
    if benchmark.family == "multiple_choice":
        return f"Thinking.\nAnswer: {item.answer}"
    if benchmark.family == "code":
        return PROGRAMS[item.id]
    return INSTRUCTION_ANSWERS[item.id]


def _fake_generator(benchmarks, num_correct: int):
    """A generate() whose first num_correct of k samples per prompt are right and the rest are not."""
    answers = {render_prompt(i, b.family): _correct_response(b, i) for b in benchmarks for i in b.items}
    calls = []

    def generate(prompts, k, temperature):
        calls.append((len(prompts), k, temperature))
        return [[answers[p] if s < num_correct else "I DON'T KNOW, SORRY" for s in range(k)] for p in prompts]

    return generate, calls


def test_evaluate_end_to_end_writes_markdown_json_png(prepared, tmp_path):
    benchmarks = load_benchmarks(prepared[0])
    strong, calls = _fake_generator(benchmarks, num_correct=3)
    weak, _ = _fake_generator(benchmarks, num_correct=1)
    reports = [
        evaluate(benchmarks, strong, k=4, temperature=0.6, run="strong", code_limits=CODE_LIMITS),
        evaluate(benchmarks, weak, k=4, temperature=0.6, run="weak", code_limits=CODE_LIMITS),
    ]
    assert calls == [(2, 4, 0.6)] * len(benchmarks)
    for report, expected in zip(reports, (0.75, 0.25), strict=True):
        assert [b.avg_at_k for b in report.benchmarks] == pytest.approx([expected] * len(benchmarks))
        assert report.average == pytest.approx(expected)
        assert all(b.pass_at_k[4] == 1.0 for b in report.benchmarks)
    wrong = [s for s in reports[0].benchmarks[0].samples if not s.correct]
    assert wrong and all("no final answer" in s.reason for s in wrong)
    for bench in reports[0].benchmarks:  # verdicts stay with their samples (code is checked concurrently)
        assert [s.correct for s in bench.samples] == [True, True, True, False] * len(bench.samples[::4])
        assert [s.sample for s in bench.samples[:4]] == [0, 1, 2, 3]

    paths = write_report(reports, tmp_path / "report")
    table = paths["markdown"].read_text().splitlines()
    assert table[0] == "| Run | AIME24 | AIME25 | AMC23 | GPQA-D | MMLU-Redux | IFBench | LCB-v6 | Avg |"
    assert table[2] == "| strong | " + " | ".join(["75.0"] * 8) + " |"
    assert table[3].startswith("| weak | 25.0")
    summary = json.loads(paths["json"].read_text())
    assert summary["runs"][1]["benchmarks"]["GPQA-D"]["avg_at_k"] == pytest.approx(0.25)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (tmp_path / "report" / "samples-weak.jsonl").read_text().splitlines()
    assert len(samples) == 4 * sum(len(b.items) for b in benchmarks)


def test_evaluate_rejects_generator_with_wrong_shape(prepared):
    benchmarks = load_benchmarks(prepared[0], ["AIME24"])
    with pytest.raises(ValueError, match="expected 2 lists of 4 responses"):
        evaluate(benchmarks, lambda prompts, k, t: [["x"]] * len(prompts), k=4, temperature=1.0)


def test_markdown_marks_missing_benchmarks(prepared):
    benchmarks = load_benchmarks(prepared[0], ["AIME24", "AMC23"])
    generate, _ = _fake_generator(benchmarks, num_correct=2)
    full = evaluate(benchmarks, generate, k=2, temperature=1.0, run="full")
    partial = evaluate(benchmarks[:1], generate, k=2, temperature=1.0, run="partial")
    assert markdown_table([full, partial]).splitlines()[3] == "| partial | 100.0 | - | 100.0 |"


def test_loose_instruction_score_forgives_a_preamble_and_markdown_emphasis():
    item = Item("x", "Answer in lowercase, ending with 'bye'.", constraints=(
        Constraint("all_lowercase", {}), Constraint("ends_with", {"phrase": "bye"})
    ))  # fmt: skip
    with_preamble = "Sure! Here it is:\nhello there, bye"
    emphasised = "**hello** there, *bye*"
    for response in (with_preamble, emphasised):
        assert not verify_instructions(response, item).correct
        assert verify_instructions(response, item, loose=True).correct
    assert not verify_instructions("HELLO\nSHOUTING, bye", item, loose=True).correct
    assert "all_lowercase" in verify_instructions("HELLO\nSHOUTING, bye", item, loose=True).reason


def test_loose_flag_is_only_for_instruction_benchmarks(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "1", "prompt": "1+1?", "answer": "2"}) + "\n")
    manifest = {"m": {"file": "m.jsonl", "family": "math", "loose": True}}
    (tmp_path / "benchmarks.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="only instruction-following benchmarks have a loose score"):
        load_benchmarks(tmp_path)
