"""The fidelity study's report: per-seed regime figures, and per method mean +- std over seeds of the
held-out accuracy and of the training signals; a markdown table, the JSON and a plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# Rows of the paper's Table 5 in its order, with its names.
LABELS = {
    "opd": "OPD",
    "mask_outlier": "Mask Outlier",
    "clip_outlier": "Clip Outlier",
    "fkl": "FKL (stand-alone)",
    "fkl_outlier": "FKL Outlier",
    "tropd_mask": "TrOPD Mask",
    "tropd_clip": "TrOPD Clip",
    "tropd": "TrOPD",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def method_rows(results: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method: (mean, std) over seeds of each reported quantity."""
    rows = {}
    for method in results["methods"]:
        runs = [seed["runs"][method] for seed in results["seeds"]]
        probes = [seed["probes"][method] for seed in results["seeds"]]
        rows[method] = {
            "accuracy": mean_std([r["accuracy_after"] for r in runs]),
            "change": mean_std([r["accuracy_after"] - r["accuracy_before"] for r in runs]),
            "trust_fraction": mean_std([r["mean_trust_fraction"] for r in runs]),
            "response_length": mean_std([r["mean_response_length"] for r in runs]),
            "final_p_trust": mean_std([p["p_trust"] for p in probes]),
            "final_outlier_share": mean_std([p["outlier_share"] for p in probes]),
            "final_outlier_fkl": mean_std([p["outlier_fkl"] for p in probes]),
            "final_response_tokens": mean_std([p["response_tokens"] for p in probes]),
        }
    return rows


def _pm(pair: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = pair
    if not math.isfinite(mean):
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _regime_lines(results: dict) -> list[str]:
    lines = [
        "| seed | teacher acc (%) | student acc (%) | teacher top-k mass | P_trust | outlier share | "
        "outlier FKL | student sample tokens | teacher trace tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in results["seeds"]:
        accuracy = {m["name"]: m["accuracy"] for m in seed["models"]}
        initial = seed["probes"]["initial"]
        lines.append(
            f"| {seed['seed']} | {100 * accuracy['teacher']:.1f} | {100 * accuracy['student']:.1f} | "
            f"{initial['teacher_topk_mass']:.3f} | {initial['p_trust']:.3f} | "
            f"{initial['outlier_share']:.3f} | "
            f"{initial['outlier_fkl']:.2f} | {initial['response_tokens']:.0f} | "
            f"{seed['teacher_trace_tokens']:.0f} |"
        )
    return lines


def _model_accuracy(results: dict, name: str) -> tuple[float, float]:
    """(mean, std) over seeds of the teacher's or the initial student's own held-out accuracy."""
    return mean_std([m["accuracy"] for seed in results["seeds"] for m in seed["models"] if m["name"] == name])


def markdown(results: dict) -> str:
    size, seeds = results["size"], [s["seed"] for s in results["seeds"]]
    teacher, student = _model_accuracy(results, "teacher"), _model_accuracy(results, "student")
    lines = [
        "# Fidelity study: the paper's Table 5 methods in a miniature of its regime",
        "",
        "Toy sizes (--quick): the numbers below only show that every phase ran." if results["quick"] else "",
        f"Vocabulary {results['vocab_size']}, teacher top-k k = {results['topk']}; seeds {seeds}; every "
        f"method distils the same student of each seed for {size['distill_steps']} steps of "
        f"{size['prompts_per_step']} prompts x {size['samples_per_prompt']} rollouts (up to "
        f"{size['response_tokens']} tokens). Held-out accuracy: avg@{size['k']} (temperature 0.6) on "
        f"{size['heldout']} problems never trained on. Guidance on for: "
        f"{', '.join(results['guided']) or 'none'}.",
        "",
        "## The regime, per seed (initial student's samples scored by the teacher)",
        "",
        *_regime_lines(results),
        "",
        f"Teacher {_pm(teacher, 100)}%, student before distillation {_pm(student, 100)}% (mean ± std over "
        f"seeds). The teacher writer's thinking words follow a Zipf law whose top {results['topk']} words "
        f"hold {results['zipf_top64_mass']:.3f} of the mass.",
        "",
        "## Methods (mean ± std over seeds)",
        "",
        "| Method | loss (guidance) | held-out acc after (%) | change (points) | trust fraction (loop) | "
        "response tokens (loop) | final P_trust | final outlier share | final outlier FKL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in method_rows(results).items():
        run = results["seeds"][0]["runs"][method]
        lines.append(
            f"| {LABELS.get(method, method)} | {run['loss']} ({'on' if run['guidance'] else 'off'}) | "
            f"{_pm(row['accuracy'], 100)} | {_pm(row['change'], 100)} | {_pm(row['trust_fraction'], 1, 3)} | "
            f"{_pm(row['response_length'])} | {_pm(row['final_p_trust'], 1, 3)} | "
            f"{_pm(row['final_outlier_share'], 1, 3)} | {_pm(row['final_outlier_fkl'], 1, 2)} |"
        )
    lines += [
        "",
        "Trust fraction and response tokens (loop) are the means over training steps of what the loop logged "
        "(every method draws the trust mask; only the TrOPD rows use it). The final columns probe each "
        "distilled student (one temperature-1 sample per prompt): P_trust = mean min(pi_T/pi_S, 1), outlier "
        "share = tokens with log(pi_T/pi_S) < log(0.2/0.8), outlier FKL = top-k FKL weighted by 1 - P_trust.",
        "",
        f"Wall time: {results['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Left: held-out accuracy after distillation per method (mean, std bars; teacher and initial student
    dashed). Right: mean accuracy curve over seeds against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, methods = method_rows(results), results["methods"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [rows[m]["accuracy"][0] for m in methods]
    stds = [rows[m]["accuracy"][1] for m in methods]
    left.bar(range(len(methods)), means, yerr=stds, capsize=4, color="tab:blue")
    left.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods], rotation=35, ha="right")
    for name, style in (("teacher", "--"), ("student", ":")):
        value = _model_accuracy(results, name)[0]
        left.axhline(value, color="grey", linestyle=style, label=f"{name} (before)")
    left.set(ylabel="held-out avg@k", ylim=(0, 1), title="Accuracy after distillation (mean ± std)")
    left.legend()
    for method in methods:
        curves = [seed["runs"][method]["accuracy_curve"] for seed in results["seeds"]]
        steps = [step for step, _ in curves[0]]
        mean_curve = [statistics.fmean(curve[i][1] for curve in curves) for i in range(len(steps))]
        right.plot(steps, mean_curve, marker="o", label=LABELS.get(method, method))
    right.set(xlabel="step", ylabel="held-out avg@k (mean over seeds)", ylim=(0, 1), title="Accuracy curve")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: dict, out_dir: Path, stem: str = "fidelity") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=2), encoding="utf-8")
    paths["md"].write_text(markdown(results), encoding="utf-8")
    plot(results, paths["png"])
    return paths
