"""The demo's report: held-out accuracy before/after each method, trust statistics, and a plot.

Everything is read back from what the runs wrote (``runs/<method>/metrics.jsonl``), so the report shows
the numbers as the loop logged them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_KEY = "eval/average"


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of one run's ``metrics.jsonl``."""
    steps, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        (evals if EVAL_KEY in record else steps).append(record)
    return steps, evals


def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def method_summary(run_dir: Path) -> dict:
    steps, evals = read_metrics(run_dir / "metrics.jsonl")
    if not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no evaluation records; was eval.interval set?")
    return {
        "accuracy_before": evals[0][EVAL_KEY],
        "accuracy_after": evals[-1][EVAL_KEY],
        "accuracy_curve": [(e["step"], e[EVAL_KEY]) for e in evals],
        "trust_curve": [(s["step"], s.get("trust_fraction", math.nan)) for s in steps],
        "mean_trust_fraction": _mean([s.get("trust_fraction") for s in steps]),
        "mean_p_trust": _mean([s.get("p_trust") for s in steps]),
        "mean_response_length": _mean([s.get("response_length") for s in steps]),
        "final_loss": steps[-1].get("loss", math.nan) if steps else math.nan,
    }


def _percent(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def markdown(summaries: dict[str, dict], models: list[dict], k: int, timings: dict, quick: bool) -> str:
    accuracy = {m["name"]: m["accuracy"] for m in models}
    lines = [
        "# Demo: distilling a 2-layer student from a 4-layer teacher (multi-step arithmetic)",
        "",
        "Toy sizes (--quick): the numbers below only show that every phase ran." if quick else "",
        f"Held-out accuracy is avg@{k} (temperature 0.6) on problems never seen in training.",
        "",
        f"Teacher: {_percent(accuracy.get('teacher'))}%  ·  student before distillation: "
        f"{_percent(accuracy.get('student'))}%",
        "",
        "| Method | avg@k before (%) | avg@k after (%) | change (points) | mean trust fraction | "
        "mean P_trust | mean response tokens | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summaries.items():
        change = 100 * (s["accuracy_after"] - s["accuracy_before"])
        before, after = _percent(s["accuracy_before"]), _percent(s["accuracy_after"])
        lines.append(
            f"| {method} | {before} | {after} | {change:+.1f} | "
            f"{s['mean_trust_fraction']:.3f} | {s['mean_p_trust']:.3f} | {s['mean_response_length']:.1f} | "
            f"{timings.get(method, math.nan):.0f} |"
        )
    lines += [
        "",
        "The trust fraction is the share of student tokens drawn into the trust region (M = 1); every run "
        "draws it, only the TrOPD losses use it. Only the TrOPD family (TrOPD, TrOPD Mask, TrOPD Clip, "
        "TrOPD AOPD) continues teacher-written prefixes (off-policy guidance); every baseline is on-policy.",
        "",
        f"Total wall time: {timings.get('total', math.nan):.0f} s.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot(summaries: dict[str, dict], teacher_accuracy: float, path: Path) -> None:
    """Left: held-out accuracy against steps (teacher dashed). Right: trust fraction against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, s in summaries.items():
        left.plot(*zip(*s["accuracy_curve"], strict=True), marker="o", label=method)
        right.plot(*zip(*s["trust_curve"], strict=True), label=method)
    left.axhline(teacher_accuracy, color="grey", linestyle="--", label="teacher")
    left.set(xlabel="step", ylabel="held-out avg@k", ylim=(0, 1), title="Accuracy")
    right.set(xlabel="step", ylabel="fraction of student tokens", ylim=(0, 1), title="Trust fraction")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_demo_report(
    root: Path, methods: list[str], models: list[dict], k: int, timings: dict, quick: bool
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``report.png`` under ``root``."""
    summaries = {method: method_summary(root / "runs" / method) for method in methods}
    paths = {"markdown": root / "report.md", "json": root / "report.json", "png": root / "report.png"}
    paths["markdown"].write_text(markdown(summaries, models, k, timings, quick), encoding="utf-8")
    payload = {"k": k, "quick": quick, "models": models, "methods": summaries, "timings_s": timings}
    paths["json"].write_text(json.dumps(payload, indent=2), encoding="utf-8")
    teacher = next((m["accuracy"] for m in models if m["name"] == "teacher"), math.nan)
    plot(summaries, teacher, paths["png"])
    return paths
