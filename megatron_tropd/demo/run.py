"""``tropd demo``: distil a small student from a teacher on a synthetic reasoning task, on 2 CPU processes.

1. Data: a sentencepiece tokenizer trained on the task, distillation prompts, 64 held-out problems.
2. Models: a 4-layer teacher trained on worked chains and a 2-layer student trained on a noisier writer
   (supervised, data parallel on 2 ranks); both are measured on the held-out set.
3. Distillation: the same student distilled with OPD, stand-alone FKL and TrOPD through the package's
   loop (``trainer.run``): same seeds, prompts and budget; held-out avg@k every few steps.
4. Report: ``report.md`` (table), ``report.json`` and ``report.png`` (accuracy and trust fraction
   against steps) in the output directory.

``--quick`` runs every phase at toy size (CI); the numbers it prints are not meaningful.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_tropd.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    EvalSettings,
    LoggingConfig,
    MethodConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
)
from megatron_tropd.demo.prepare import VOCAB_SIZE, train_tokenizer, write_heldout, write_prompts
from megatron_tropd.demo.pretrain import HeldOutEvaluation, PretrainSpec
from megatron_tropd.demo.task import problems
from megatron_tropd.model_config import ModelConfig, tiny

logger = logging.getLogger("megatron_tropd.demo")

WORLD_SIZE = 2
METHODS = ("opd", "fkl", "tropd")
EVAL_TEMPERATURE = 0.6  # the models' own measurement and the runs' in-loop evaluation share it
PROMPT_TOKENS, RESPONSE_TOKENS = 24, 40  # longest prompt is 14 tokens, longest worked chain 33 + EOS


@dataclass(frozen=True)
class DemoSize:
    """Every knob that differs between the full demo and ``--quick``."""

    teacher_steps: int
    student_steps: int
    sft_batch: int
    distill_steps: int
    eval_interval: int
    heldout: int
    k: int
    prompts_per_step: int
    samples_per_prompt: int


FULL = DemoSize(
    teacher_steps=250, student_steps=300, sft_batch=64, distill_steps=40, eval_interval=10, heldout=64,
    k=4, prompts_per_step=16, samples_per_prompt=4,
)  # fmt: skip
QUICK = DemoSize(
    teacher_steps=4, student_steps=4, sft_batch=8, distill_steps=2, eval_interval=1, heldout=4, k=2,
    prompts_per_step=2, samples_per_prompt=2,
)  # fmt: skip


def model_pair(vocab_size: int, max_positions: int) -> tuple[ModelConfig, ModelConfig]:
    """(teacher, student): the student has half the teacher's depth and three quarters of its width."""
    common = dict(vocab_size=vocab_size, max_position_embeddings=max_positions)
    teacher = tiny("qwen2", num_layers=4, hidden_size=128, ffn_hidden_size=384, **common)
    student = tiny("qwen2", num_layers=2, hidden_size=96, ffn_hidden_size=288, **common)
    return teacher, student


def model_configs() -> tuple[ModelConfig, ModelConfig]:
    """The demo's (teacher, student), with room for a prompt, a response and a few spare positions."""
    return model_pair(VOCAB_SIZE, PROMPT_TOKENS + RESPONSE_TOKENS + 8)


@dataclass(frozen=True)
class DemoFiles:
    root: Path
    tokenizer: Path
    prompts: Path
    heldout: Path
    teacher: Path
    student: Path

    def run_dir(self, method: str) -> Path:
        return self.root / "runs" / method


def prepare_data(root: Path, size: DemoSize, seed: int) -> DemoFiles:
    """Tokenizer, held-out benchmark and distillation prompts (held-out prompts excluded from training)."""
    root.mkdir(parents=True, exist_ok=True)
    heldout = problems(seed, size.heldout)
    train = problems(seed + 1, 2000, exclude={p.prompt for p in heldout})
    models, tokenizer = root / "models", train_tokenizer(root, seed)
    return DemoFiles(
        root=root, tokenizer=tokenizer, prompts=write_prompts(root / "prompts.jsonl", train),
        heldout=write_heldout(root / "heldout", heldout), teacher=models / "teacher",
        student=models / "student",
    )  # fmt: skip


def _rows_per_rank(size: DemoSize) -> int:
    """The loop's generation batch per rank; the models' own evaluation uses the same, so the student's
    accuracy before distillation is computed exactly as the runs' step-0 evaluation."""
    return size.prompts_per_step * size.samples_per_prompt // WORLD_SIZE


def eval_settings(files: DemoFiles, size: DemoSize, seed: int) -> HeldOutEvaluation:
    settings = EvalSettings(
        samples_per_prompt=size.k,
        temperature=EVAL_TEMPERATURE,
        max_new_tokens=RESPONSE_TOKENS,
        raw_prompts=True,
    )
    return HeldOutEvaluation(str(files.heldout), settings, max_batch_size=_rows_per_rank(size), seed=seed)


def pretrain_specs(size: DemoSize, seed: int) -> list[PretrainSpec]:
    """The teacher learns the worked chains; the student a writer that skips or slips (see task.py)."""
    teacher, student = model_configs()
    return [
        PretrainSpec("teacher", teacher, size.teacher_steps, size.sft_batch, lr=3e-3, seed=seed),
        PretrainSpec(
            "student", student, size.student_steps, size.sft_batch, lr=3e-3, seed=seed + 1,
            skip_rate=0.5, slip_rate=0.05,
        ),
    ]  # fmt: skip


def distill_config(method: str, files: DemoFiles, size: DemoSize, seed: int) -> RunConfig:
    """One method's run: identical for every method except the method itself and its default guidance
    (on for the TrOPD family only, ``methods.METHOD_SPECS``)."""
    teacher, student = model_configs()
    return RunConfig(
        name=f"demo_{method}", student=student, teacher=teacher,
        method=MethodConfig(name=method, topk=8),
        optim=OptimConfig(lr=5e-4, micro_batch_size=_rows_per_rank(size)),
        rollout=RolloutConfig(
            prompts_per_step=size.prompts_per_step, samples_per_prompt=size.samples_per_prompt,
            max_prompt_length=PROMPT_TOKENS, max_new_tokens=RESPONSE_TOKENS, seed=seed,
        ),
        data=DataConfig(
            train_prompts=str(files.prompts), tokenizer=str(files.tokenizer), chat_template="none"
        ),
        checkpoint=CheckpointConfig(
            save_dir=str(files.run_dir(method)), save_interval=size.distill_steps, keep_last=1,
            student_init=str(files.student), teacher=str(files.teacher), resume="never",
        ),
        eval=EvalConfig(
            interval=size.eval_interval, benchmarks=str(files.heldout), samples_per_prompt=size.k,
            temperature=EVAL_TEMPERATURE, max_new_tokens=RESPONSE_TOKENS, raw_prompts=True,
        ),
        logging=LoggingConfig(tensorboard=False),
        train_steps=size.distill_steps, seed=seed,
    ).resolved()  # fmt: skip


def distill_worker(rank: int, world_size: int, config: RunConfig) -> list[dict]:
    from megatron_tropd.demo.pretrain import quiet_worker

    quiet_worker()  # before the trainer imports Megatron
    from megatron_tropd.trainer import run

    return run(config)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tropd demo",
        description="Distil a small student from a teacher on a synthetic arithmetic task (2 CPU processes); "
        "OPD vs stand-alone FKL vs TrOPD, report in --out.",
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes for a fast end-to-end check (CI)")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated methods (default: {','.join(METHODS)})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and sampling")
    parser.add_argument("--fresh", action="store_true", help="delete the output directory first")
    return parser.parse_args(argv)


def _check_methods(names: str) -> list[str]:
    from megatron_tropd.config import METHOD_NAMES

    methods = [m.strip() for m in names.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHOD_NAMES]:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_NAMES)}")
    if not methods:
        raise SystemExit("--methods: name at least one method")
    return methods


def main(argv: list[str] | None = None) -> int:
    from megatron_tropd.demo.pretrain import pretrain
    from megatron_tropd.demo.report import write_demo_report
    from megatron_tropd.spawn import run_on_ranks

    args = _parse(argv)
    methods = _check_methods(args.methods)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size, root = (QUICK if args.quick else FULL), Path(args.out)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    if (root / "runs").exists():
        raise SystemExit(f"{root} holds an earlier demo: pass --fresh to replace it or --out elsewhere")
    started = time.perf_counter()
    files = prepare_data(root, size, args.seed)
    logger.info("data ready in %s", root)
    specs = pretrain_specs(size, args.seed)
    settings = eval_settings(files, size, args.seed)
    models = run_on_ranks(
        pretrain, WORLD_SIZE, specs, str(files.tokenizer), [str(files.teacher), str(files.student)], settings
    )[0]
    timings = {"prepare_and_pretrain": time.perf_counter() - started}
    for method in methods:
        method_started = time.perf_counter()
        run_on_ranks(distill_worker, WORLD_SIZE, distill_config(method, files, size, args.seed))
        timings[method] = time.perf_counter() - method_started
    timings["total"] = time.perf_counter() - started
    paths = write_demo_report(root, methods, models, size.k, timings, quick=args.quick)
    print(paths["markdown"].read_text(encoding="utf-8"))
    logger.info("report: %s, %s, %s", *paths.values())
    return 0
