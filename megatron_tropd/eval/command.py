"""Evaluate a Megatron checkpoint on benchmarks, or compare earlier results (``tropd eval``).

    tropd eval --checkpoint CKPT --tokenizer TOK --benchmarks DIR --k 4 --temperature 0.6 \\
        --max-new-tokens 1024 [--tp 2] [--pp 1] [--names AIME24,MATH500] --out results/step200
    tropd eval --checkpoint CKPT --tokenizer TOK --benchmarks DIR --out results/x samples_per_prompt=32

The evaluation settings are ``EvalSettings`` (``megatron_tropd/config.py``), with the defaults that a
run's in-training evaluation (``eval.*``) has: set them with the flags or as ``key=value``.
    tropd eval --compare results/base results/step200 --out results/compare

Under torchrun / srun (``RANK`` and ``WORLD_SIZE`` set) it runs on the launcher's ranks; ``--cpu-ranks N``
spawns N local gloo ranks; otherwise it runs in this one process. Rank 0 writes the report (results.md,
results.json, results.png and the samples) into ``--out``. ``--compare`` loads earlier results.json files
and writes one side-by-side table and chart, without a model. Bad input exits with status 2 before any
rank starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from megatron_tropd.config import DECODERS
from megatron_tropd.console import configure_console

logger = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tropd eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Megatron weights, a step directory or a run root")
    parser.add_argument("--tokenizer", help="sentencepiece .model or an HF tokenizer.json directory")
    parser.add_argument("--benchmarks", help="directory with benchmarks.json (tools/prepare_benchmarks.py)")
    # The evaluation settings: these flags, or key=value (EvalSettings fields), defaults EvalSettings()'s.
    parser.add_argument("--names", default=None, help="comma-separated benchmark names (default: all)")
    parser.add_argument("--k", type=int, default=None, help="samples per prompt (samples_per_prompt)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--out", required=True, help="directory the report is written into")
    parser.add_argument("--run-name", default=None, help="the run's name in the report (default: checkpoint)")
    parser.add_argument("--chat-template", default="auto", help="'auto', 'none' or a Jinja template string")
    parser.add_argument(
        "--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
        help='extra chat-template variables, e.g. \'{"enable_thinking": false}\' (data.chat_template_kwargs)',
    )  # fmt: skip
    parser.add_argument(
        "--raw-prompts", action="store_true", default=None, help="no answer-format instruction appended"
    )
    parser.add_argument("--max-prompts", type=int, default=None, help="first N items per benchmark (0 = all)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="rows decoded at once per replica")
    parser.add_argument("--seed", type=int, default=0, help="keys the sampling")
    parser.add_argument(
        "--decoder", default="auto", choices=DECODERS, help="decode path (see rollout.decoder)"
    )
    parser.add_argument("--cpu-ranks", type=int, default=0, help="spawn N local gloo ranks (no launcher)")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="results directories to put side by side")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="evaluation settings, as in a run's eval.*: samples_per_prompt=4 temperature=0.6 names=[AIME24]",
    )  # fmt: skip
    return parser


def _json_object(text: str) -> dict:
    """``--chat-template-kwargs``: a JSON object (argparse reports an ArgumentTypeError as a usage error)."""
    from megatron_tropd.data import check_template_kwargs

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        example = '{"enable_thinking": false}'
        message = f"not JSON ({error.msg}): give an object such as '{example}'"
        raise argparse.ArgumentTypeError(message) from None
    try:
        return check_template_kwargs(value, "--chat-template-kwargs")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_FLAG_SETTINGS = {
    "names": "names", "k": "samples_per_prompt", "temperature": "temperature",
    "max_new_tokens": "max_new_tokens", "max_prompts": "max_prompts", "raw_prompts": "raw_prompts",
}  # fmt: skip


def eval_settings(args: argparse.Namespace):
    """The ``EvalSettings`` of the command line: the shared defaults, then the flags given, then the
    ``key=value`` overrides (``eval.`` prefix optional); ValueError naming the key on bad input."""
    from megatron_tropd.config import EvalSettings
    from megatron_tropd.overrides import apply_overrides

    flags = {
        field: getattr(args, flag)
        for flag, field in _FLAG_SETTINGS.items()
        if getattr(args, flag) is not None
    }
    if "names" in flags:
        flags["names"] = tuple(name for name in flags["names"].split(",") if name)
    overrides = [override.removeprefix("eval.") for override in args.overrides]
    settings = apply_overrides(dataclasses.replace(EvalSettings(), **flags), overrides)
    settings.validate(prefix="")
    return settings


def _evaluation_options(args: argparse.Namespace) -> dict:
    """Arguments of ``evaluate_checkpoint`` after the paths (picklable, for spawned ranks)."""
    return {
        "settings": eval_settings(args),
        "tensor_parallel": args.tp,
        "pipeline_parallel": args.pp,
        "chat_template": args.chat_template,
        "chat_template_kwargs": args.chat_template_kwargs,
        "run_name": args.run_name,
        "max_batch_size": args.max_batch_size,
        "seed": args.seed,
        "decoder": args.decoder,
    }


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _world_size(args: argparse.Namespace) -> int:
    if _launched():
        return int(os.environ["WORLD_SIZE"])
    return args.cpu_ranks or 1


def _check_inputs(args: argparse.Namespace) -> None:
    """Everything ``evaluate_checkpoint`` refuses before a model exists; ValueError on bad input."""
    from megatron_tropd.eval.harness import prepare_evaluation

    missing = [flag for flag in ("checkpoint", "tokenizer", "benchmarks") if not getattr(args, flag)]
    if missing:
        raise ValueError(f"missing {', '.join('--' + m for m in missing)} (or use --compare DIR ...)")
    if args.cpu_ranks < 0:
        raise ValueError(f"--cpu-ranks must be >= 0, got {args.cpu_ranks}")
    prepare_evaluation(
        args.checkpoint, args.tokenizer, args.benchmarks, eval_settings(args),
        chat_template=args.chat_template, chat_template_kwargs=args.chat_template_kwargs,
        world_size=_world_size(args), tensor_parallel=args.tp, pipeline_parallel=args.pp,
    )  # fmt: skip


def evaluate_job(rank: int, world_size: int, checkpoint: str, tokenizer: str, benchmarks: str, options: dict):
    """One rank's share of the evaluation; rank 0 returns the report, the others None."""
    from megatron_tropd.eval.harness import evaluate_checkpoint

    del world_size
    report = evaluate_checkpoint(checkpoint, tokenizer, benchmarks, **options)
    return report if rank == 0 else None


def _evaluate(args: argparse.Namespace):
    """The report on rank 0 (None on the other launched ranks)."""
    job_args = (args.checkpoint, args.tokenizer, args.benchmarks, _evaluation_options(args))
    if _launched() or not args.cpu_ranks:
        from megatron_tropd.runtime import init_distributed, shutdown_distributed

        info = init_distributed()
        try:
            return evaluate_job(info.rank, info.world_size, *job_args)
        finally:
            shutdown_distributed()
    from megatron_tropd.spawn import run_on_ranks

    return run_on_ranks(evaluate_job, args.cpu_ranks, *job_args)[0]


def _distinct_runs(reports: list, sources: list[str]) -> list:
    """Name each run after its directory where two runs share a name, so the table stays readable."""
    names = [r.run for r in reports]
    for report, source in zip(reports, sources, strict=True):
        if names.count(report.run) > 1:
            report.run = f"{report.run} ({Path(source).name})"
    return reports


def compare(directories: list[str], out_dir: str | Path) -> dict[str, Path]:
    """One table (results.md), summary (results.json) and chart (results.png) of earlier runs."""
    from megatron_tropd.eval.scoring import load_results, write_summary

    reports, sources = [], []
    for directory in directories:
        loaded = load_results(directory)
        reports += loaded
        sources += [directory] * len(loaded)
    return write_summary(_distinct_runs(reports, sources), out_dir)


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 done, 2 bad input."""
    args = build_parser().parse_args(argv)
    # Rank 0's INFO lines only. --compare reads result files: no torch to ask about CUDA.
    configure_console(fmt="%(levelname)s %(name)s: %(message)s", cuda=False if args.compare else None)
    try:
        if args.compare:
            paths = compare(args.compare, args.out)
            print(paths["markdown"].read_text(encoding="utf-8"), end="")
            return 0
        _check_inputs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = _evaluate(args)
    if report is None:
        return 0  # a launched rank other than 0: rank 0 writes
    from megatron_tropd.eval.scoring import markdown_table, write_report

    write_report([report], args.out)
    print(markdown_table([report]), end="")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
