"""Evaluate a generator on benchmarks, score avg@k / pass@k, and write the paper-layout report.

The generation side is a callable ``generate(prompts, k, temperature) -> list[list[str]]`` (k responses per
prompt), so the rollout engine, an HF pipeline or a fake in tests plug in the same way. The headline
metric is avg@k: per prompt the fraction of its k samples that are correct, averaged over prompts (the
paper's number); pass@k uses the unbiased estimator of Chen et al. (2021). Each domain's score
(``Benchmark.domain``) is the unweighted mean of its benchmarks' avg@k, as the overall average is of all.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_tropd.eval.sandbox import SandboxLimits
from megatron_tropd.eval.schema import LETTERS, Benchmark, Item
from megatron_tropd.eval.verifiers import Verdict, verify_item

logger = logging.getLogger(__name__)

Generate = Callable[[list[str], int, float], list[list[str]]]

# At most this many sandboxed programs run at once while a code benchmark is checked.
MAX_CODE_CHECKS_AT_ONCE = 8

# Appended to every prompt of a family so that the verifier can find the answer (the chat template is the
# generation side's business).
PROMPT_SUFFIX = {
    "math": "\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "multiple_choice": "\n\nAnswer with the letter of the correct option, as 'Answer: X'.",
    "code": "\n\nWrite a complete Python 3 program that reads from standard input and writes to standard "
    "output. Put the program in one ```python code block.",
    "instruction": "",
}


def render_prompt(item: Item, family: str, raw: bool = False) -> str:
    """The text sent to the model for one item (options lettered for multiple choice); ``raw`` leaves
    out the family's answer-format instruction (prompts that already say how to answer)."""
    body = item.prompt
    if family == "multiple_choice":
        body += "\n\n" + "\n".join(f"{LETTERS[i]}) {option}" for i, option in enumerate(item.options))
    if family == "code" and item.entry is not None:
        return body + f"\n\nImplement `{item.entry}` in one ```python code block."
    return body if raw else body + PROMPT_SUFFIX[family]


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of the fraction of that prompt's samples that are correct."""
    if not correct:
        raise ValueError("avg@k of zero prompts is undefined")
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def pass_at_k_one(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one prompt: 1 - C(n - c, k) / C(n, k), as a stable product."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= number of samples ({num_samples})")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over prompts of the unbiased pass@k estimate."""
    if not correct:
        raise ValueError("pass@k of zero prompts is undefined")
    return sum(pass_at_k_one(len(s), sum(s), k) for s in correct) / len(correct)


@dataclass
class SampleResult:
    item_id: str
    sample: int
    correct: bool
    reason: str
    response: str


@dataclass
class BenchmarkResult:
    name: str
    family: str
    num_prompts: int
    avg_at_k: float
    pass_at_k: dict[int, float]
    samples: list[SampleResult] = field(default_factory=list)
    domain: str = ""
    """The benchmark's domain (``Benchmark.domain``); empty means its family."""

    def __post_init__(self):
        if not self.domain:
            self.domain = self.family


@dataclass
class EvalReport:
    run: str
    k: int
    temperature: float
    benchmarks: list[BenchmarkResult]

    @property
    def average(self) -> float:
        """Unweighted mean of the benchmarks' avg@k (the paper's Avg column)."""
        return sum(b.avg_at_k for b in self.benchmarks) / len(self.benchmarks)

    @property
    def domain_averages(self) -> dict[str, float]:
        """Per domain (in order of first appearance), the unweighted mean of its benchmarks' avg@k."""
        by_domain: dict[str, list[float]] = {}
        for b in self.benchmarks:
            by_domain.setdefault(b.domain, []).append(b.avg_at_k)
        return {domain: sum(scores) / len(scores) for domain, scores in by_domain.items()}

    def scores(self) -> dict[str, float]:
        """avg@k per benchmark, ``average``, and ``domain/<d>`` per domain when there are several (the
        in-training evaluation's record)."""
        scores = {b.name: b.avg_at_k for b in self.benchmarks} | {"average": self.average}
        domains = self.domain_averages
        if len(domains) > 1:
            scores |= {f"domain/{d}": value for d, value in domains.items()}
        return scores

    def summary(self) -> dict:
        """Metrics without per-sample records (what results.json holds)."""
        return {
            "run": self.run,
            "k": self.k,
            "temperature": self.temperature,
            "average": self.average,
            "domains": self.domain_averages,
            "benchmarks": {
                b.name: {
                    "family": b.family,
                    "domain": b.domain,
                    "num_prompts": b.num_prompts,
                    "avg_at_k": b.avg_at_k,
                    "pass_at_k": b.pass_at_k,
                }
                for b in self.benchmarks
            },
        }


def _generate_checked(generate: Generate, prompts: list[str], k: int, temperature: float) -> list[list[str]]:
    responses = generate(prompts, k, temperature)
    if len(responses) != len(prompts) or any(len(r) != k for r in responses):
        shape = [len(r) for r in responses]
        raise ValueError(
            f"generate returned {len(responses)} lists of sizes {shape[:8]}...; "
            f"expected {len(prompts)} lists of {k} responses each"
        )
    return responses


def _code_checks_at_once() -> int:
    """Every rank of a job scores the same responses: share the node's cores among its local ranks."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_CODE_CHECKS_AT_ONCE, (os.cpu_count() or 1) // max(1, local_ranks)))


def _verify_all(
    benchmark: Benchmark, responses: list[list[str]], code_limits: SandboxLimits | None
) -> list[list[Verdict]]:
    """Verdicts per item and sample, in order.

    A code check waits on a sandboxed subprocess, so code responses are checked several at a time on
    threads (``_code_checks_at_once``). The other families verify on this thread: they are quick, and
    math-verify's time limits use signals, which work on the main thread only.
    """
    pairs = zip(benchmark.items, responses, strict=True)
    jobs = [(item, response) for item, item_responses in pairs for response in item_responses]

    def verify(job: tuple[Item, str]) -> Verdict:
        return verify_item(benchmark.family, job[0], job[1], code_limits, benchmark.loose)

    if benchmark.family == "code":
        with ThreadPoolExecutor(max_workers=_code_checks_at_once()) as pool:
            flat = list(pool.map(verify, jobs))
    else:
        flat = [verify(job) for job in jobs]
    k = len(responses[0]) if responses else 0
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def evaluate_benchmark(
    benchmark: Benchmark,
    generate: Generate,
    k: int,
    temperature: float,
    code_limits: SandboxLimits | None = None,
    raw_prompts: bool = False,
) -> BenchmarkResult:
    """Generate k responses per item, verify each, and score the benchmark."""
    prompts = [render_prompt(item, benchmark.family, raw_prompts) for item in benchmark.items]
    responses = _generate_checked(generate, prompts, k, temperature)
    samples, correct = [], []
    all_verdicts = _verify_all(benchmark, responses, code_limits)
    for item, item_responses, verdicts in zip(benchmark.items, responses, all_verdicts, strict=True):
        correct.append([v.correct for v in verdicts])
        samples += [
            SampleResult(item.id, i, v.correct, v.reason, r)
            for i, (v, r) in enumerate(zip(verdicts, item_responses, strict=True))
        ]
    pass_ks = sorted({1, k})
    result = BenchmarkResult(
        benchmark.name,
        benchmark.family,
        len(prompts),
        avg_at_k(correct),
        {n: pass_at_k(correct, n) for n in pass_ks},
        samples,
        benchmark.domain,
    )
    logger.info("%s: avg@%d %.4f over %d prompts", benchmark.name, k, result.avg_at_k, len(prompts))
    return result


def evaluate(
    benchmarks: Sequence[Benchmark],
    generate: Generate,
    k: int,
    temperature: float,
    run: str = "run",
    code_limits: SandboxLimits | None = None,
    raw_prompts: bool = False,
) -> EvalReport:
    """Evaluate one generator on every benchmark; the report carries per-sample verdicts and reasons."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    results = [evaluate_benchmark(b, generate, k, temperature, code_limits, raw_prompts) for b in benchmarks]
    return EvalReport(run=run, k=k, temperature=temperature, benchmarks=results)


# ------------------------------------------------------------------------------------------- reports


def _benchmark_names(reports: Sequence[EvalReport]) -> list[str]:
    names: list[str] = []
    for report in reports:
        names += [b.name for b in report.benchmarks if b.name not in names]
    return names


def _domain_names(reports: Sequence[EvalReport]) -> list[str]:
    names: list[str] = []
    for report in reports:
        names += [d for d in report.domain_averages if d not in names]
    return names


def _percent_cells(scores: dict[str, float], columns: list[str]) -> str:
    return " | ".join(f"{100 * scores[c]:.1f}" if c in scores else "-" for c in columns)


def _domain_table(reports: Sequence[EvalReport]) -> list[str]:
    """Rows = runs, columns = domains (the mean avg@k of each domain's benchmarks); none for one domain."""
    domains = _domain_names(reports)
    if len(domains) < 2:
        return []
    rows = [f"| {r.run} | {_percent_cells(r.domain_averages, domains)} |" for r in reports]
    header = ["| Run | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    return ["", "Per domain:", "", *header, *rows]


def markdown_table(reports: Sequence[EvalReport]) -> str:
    """Rows = runs, columns = benchmarks + Avg; avg@k in percent, '-' where a run lacks a benchmark.
    With benchmarks of several domains, a second table gives each domain's mean."""
    names = _benchmark_names(reports)
    lines = ["| Run | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for report in reports:
        cells = _percent_cells({b.name: b.avg_at_k for b in report.benchmarks}, names)
        lines.append(f"| {report.run} | {cells} | {100 * report.average:.1f} |")
    return "\n".join(lines + _domain_table(reports)) + "\n"


def plot_comparison(reports: Sequence[EvalReport], path: Path) -> None:
    """Grouped bar chart: one group per benchmark (and Avg), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    names = _benchmark_names(reports) + ["Avg"]
    width = 0.8 / len(reports)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 4.0))
    for index, report in enumerate(reports):
        scores = {b.name: b.avg_at_k for b in report.benchmarks} | {"Avg": report.average}
        positions = [j + index * width for j in range(len(names))]
        axes.bar(positions, [100 * scores.get(n, 0.0) for n in names], width, label=report.run)
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    axes.set_ylabel(f"avg@{reports[0].k} (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_summary(reports: Sequence[EvalReport], out_dir: str | Path) -> dict[str, Path]:
    """Write results.md (paper table), results.json (metrics) and results.png; no per-sample files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        kind: out_dir / f"results.{suffix}"
        for kind, suffix in (("markdown", "md"), ("json", "json"), ("png", "png"))
    }
    paths["markdown"].write_text(markdown_table(reports), encoding="utf-8")
    summary = {"runs": [r.summary() for r in reports]}
    paths["json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_comparison(reports, paths["png"])
    return paths


def write_report(reports: Sequence[EvalReport], out_dir: str | Path) -> dict[str, Path]:
    """``write_summary`` plus samples-<run>.jsonl: every sample's response, verdict and reason."""
    paths = write_summary(reports, out_dir)
    for report in reports:
        with open(Path(out_dir) / f"samples-{report.run}.jsonl", "w", encoding="utf-8") as handle:
            for bench in report.benchmarks:
                for sample in bench.samples:
                    handle.write(json.dumps({"benchmark": bench.name, **asdict(sample)}) + "\n")
    return paths


def report_from_summary(summary: dict) -> EvalReport:
    """An ``EvalReport`` (metrics only, no samples) from one run of a results.json."""
    benchmarks = [
        BenchmarkResult(
            name,
            entry["family"],
            entry["num_prompts"],
            entry["avg_at_k"],
            {int(n): value for n, value in entry["pass_at_k"].items()},
            domain=entry.get("domain", ""),  # older files have none: the family
        )
        for name, entry in summary["benchmarks"].items()
    ]
    return EvalReport(summary["run"], summary["k"], summary["temperature"], benchmarks)


def load_results(path: str | Path) -> list[EvalReport]:
    """The runs of a results.json written by ``write_report`` (a file, or the directory holding it)."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a directory (or results.json) written by write_report")
    try:
        return [report_from_summary(run) for run in json.loads(path.read_text(encoding="utf-8"))["runs"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a results.json written by write_report ({exc})") from None
