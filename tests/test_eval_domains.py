"""Per-domain evaluation: the ``domain`` of a benchmarks.json entry, per-domain averages in the report,
results.json and results.md, and the ``domain/<d>`` scores of the in-training record."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_tropd.eval.sandbox import SandboxLimits
from megatron_tropd.eval.schema import load_benchmarks
from megatron_tropd.eval.scoring import evaluate, load_results, markdown_table, render_prompt, write_summary
from megatron_tropd.metrics_log import eval_record
from recipes.paper import deepseek_multi_two_teachers
from tests.prepare_tool import load_prepare_tool

HUB_FIXTURES = Path(__file__).parent / "fixtures" / "eval" / "hub"
CODE_LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_bytes=256 << 20)
K = 4
ADDER = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"

# Benchmark -> rows, each with how many of its K samples the fake generator gets right.
ROWS = {
    "M1": [
        ({"id": "a", "prompt": "1+1?", "answer": "2"}, 4),
        ({"id": "b", "prompt": "2+2?", "answer": "4"}, 2),
    ],
    "M2": [({"id": "c", "prompt": "3+3?", "answer": "6"}, 1)],
    "C1": [({"id": "add", "prompt": "Add two integers.", "tests": [{"input": "1 2\n", "output": "3\n"}]}, 3)],
}
FAMILIES = {"M1": "math", "M2": "math", "C1": "code"}
# avg@4: M1 (4/4 + 2/4) / 2 = 0.75, M2 0.25, C1 0.75; math (0.75 + 0.25) / 2 = 0.5, code 0.75.
EXPECTED_DOMAINS = {"math": 0.5, "code": 0.75}
EXPECTED_AVERAGE = (0.75 + 0.25 + 0.75) / 3


def _write_benchmarks(directory: Path, extra: dict[str, dict] | None = None) -> Path:
    """The three benchmarks as JSONL files plus benchmarks.json; ``extra`` adds keys to entries."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, rows in ROWS.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row, _ in rows))
        manifest[name] = {"family": FAMILIES[name], "file": f"{name}.jsonl", **(extra or {}).get(name, {})}
    (directory / "benchmarks.json").write_text(json.dumps(manifest))
    return directory


def _correct_response(family: str, row: dict) -> str:
    return ADDER if family == "code" else f"so the answer is \\boxed{{{row['answer']}}}."


def _fake_generator(benchmarks):
    """A generate() that gets the first ``ROWS`` count of each prompt's K samples right."""
    answers = {}
    for benchmark in benchmarks:
        for item, (row, num_correct) in zip(benchmark.items, ROWS[benchmark.name], strict=True):
            answers[render_prompt(item, benchmark.family)] = (
                _correct_response(benchmark.family, row),
                num_correct,
            )

    def generate(prompts, k, temperature):
        return [[answers[p][0] if s < answers[p][1] else "no idea" for s in range(k)] for p in prompts]

    return generate


def _restricted(report, keep, run=None):
    """The report with only the benchmarks named in ``keep`` (renamed ``run`` if given)."""
    benchmarks = [b for b in report.benchmarks if b.name in keep]
    return replace(report, benchmarks=benchmarks, run=run or report.run)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    benchmarks = load_benchmarks(_write_benchmarks(tmp_path_factory.mktemp("bench")))
    return evaluate(
        benchmarks, _fake_generator(benchmarks), K, 0.6, run="two-domains", code_limits=CODE_LIMITS
    )


def test_domain_defaults_to_the_family(tmp_path):
    benchmarks = load_benchmarks(_write_benchmarks(tmp_path))
    assert {b.name: b.domain for b in benchmarks} == {"M1": "math", "M2": "math", "C1": "code"}


def test_domain_key_overrides_the_family(tmp_path):
    benchmarks = load_benchmarks(_write_benchmarks(tmp_path, {"M2": {"domain": "olympiad"}}))
    assert {b.name: (b.family, b.domain) for b in benchmarks} == {
        "M1": ("math", "math"),
        "M2": ("math", "olympiad"),
        "C1": ("code", "code"),
    }


@pytest.mark.parametrize("bad", ["", " math", 3, None, ["math"]])
def test_bad_domain_names_the_file_and_the_entry(tmp_path, bad):
    directory = _write_benchmarks(tmp_path, {"C1": {"domain": bad}})
    with pytest.raises(ValueError, match="'domain' must be a non-empty string") as error:
        load_benchmarks(directory)
    assert str(directory / "benchmarks.json") in str(error.value) and "'C1'" in str(error.value)


def test_domain_averages_are_the_mean_of_each_domains_benchmarks(report):
    assert [b.avg_at_k for b in report.benchmarks] == pytest.approx([0.75, 0.25, 0.75])
    assert report.domain_averages == pytest.approx(EXPECTED_DOMAINS)
    assert list(report.domain_averages) == ["math", "code"]  # order of first appearance
    assert report.average == pytest.approx(EXPECTED_AVERAGE)


def test_in_training_record_has_domain_scores_only_with_several_domains(report):
    scores = report.scores()
    assert scores == pytest.approx(
        {
            "M1": 0.75,
            "M2": 0.25,
            "C1": 0.75,
            "average": EXPECTED_AVERAGE,
            "domain/math": 0.5,
            "domain/code": 0.75,
        }
    )
    assert {"eval/domain/math", "eval/domain/code"} <= set(eval_record(3, scores))
    math_only = _restricted(report, ("M1", "M2"))
    assert not any(name.startswith("domain/") for name in math_only.scores())


def test_results_json_round_trips_the_domains(report, tmp_path):
    paths = write_summary([report], tmp_path)
    run = json.loads(paths["json"].read_text())["runs"][0]
    assert run["domains"] == pytest.approx(EXPECTED_DOMAINS)
    assert run["benchmarks"]["C1"]["domain"] == "code"
    (loaded,) = load_results(tmp_path)
    assert [b.domain for b in loaded.benchmarks] == ["math", "math", "code"]
    assert loaded.domain_averages == pytest.approx(EXPECTED_DOMAINS)


def test_markdown_has_a_domain_table_only_with_several_domains(report):
    lines = markdown_table([report]).splitlines()
    assert lines[0] == "| Run | M1 | M2 | C1 | Avg |"
    assert lines[2] == "| two-domains | 75.0 | 25.0 | 75.0 | 58.3 |"
    assert lines[3:] == [
        "",
        "Per domain:",
        "",
        "| Run | math | code |",
        "|---|---|---|",
        "| two-domains | 50.0 | 75.0 |",
    ]
    math_only = _restricted(report, ("M1", "M2"))
    assert "Per domain" not in markdown_table([math_only])


def test_markdown_marks_a_domain_a_run_lacks(report):
    math_only = _restricted(report, ("M1",), run="math-only")
    assert markdown_table([report, math_only]).splitlines()[-1] == "| math-only | 75.0 | - |"


def test_results_json_without_domains_still_loads(tmp_path):
    entry = {"num_prompts": 2, "pass_at_k": {"1": 0.5}}
    benchmarks = {
        "M1": {"family": "math", "avg_at_k": 0.5, **entry},
        "C1": {"family": "code", "avg_at_k": 0.25, **entry},
    }
    old = {"runs": [{"run": "old", "k": 1, "temperature": 0.6, "average": 0.375, "benchmarks": benchmarks}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    (loaded,) = load_results(tmp_path)
    assert [b.domain for b in loaded.benchmarks] == ["math", "code"]
    assert loaded.domain_averages == {"math": 0.5, "code": 0.25}


# ------------------------------------------------------------------- prepared benchmarks and recipes


@pytest.fixture(scope="module")
def prepared_manifest(tmp_path_factory):
    prepare_tool = load_prepare_tool()
    out = tmp_path_factory.mktemp("prepared")
    return prepare_tool.prepare(out, list(prepare_tool.SOURCES), local_dir=HUB_FIXTURES)


def test_prepared_domains_route_to_the_two_teacher_recipes_teachers(prepared_manifest):
    domains = {name: entry["domain"] for name, entry in prepared_manifest.items()}
    assert domains == {
        "AIME24": "math",
        "AIME25": "math",
        "AMC23": "math",
        "GPQA-D": "science",
        "MMLU-Redux": "multiple_choice",
        "IFBench": "instruction",
        "LCB-v6": "code",
    }
    config = deepseek_multi_two_teachers()
    routes = {domain: config.route(domain) for domain in ("math", "code", "science")}
    assert routes == {"math": "math", "code": "code", "science": "code"}


def test_prepare_domain_option_overrides_and_refuses_bad_input(tmp_path):
    prepare_tool = load_prepare_tool()
    argv = ["--out", str(tmp_path), "--only", "AIME24", "--local", str(HUB_FIXTURES)]
    assert prepare_tool.main([*argv, "--domain", "AIME24=olympiad"]) == 0
    assert json.loads((tmp_path / "benchmarks.json").read_text())["AIME24"]["domain"] == "olympiad"
    assert load_benchmarks(tmp_path)[0].domain == "olympiad"
    for bad in ("AIME24=", "NoSuchBench=math", "AIME24"):
        with pytest.raises(SystemExit):
            prepare_tool.main([*argv, "--domain", bad])
