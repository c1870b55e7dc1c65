"""Supervised training of the demo's teacher and student on their writers' texts (data parallel ranks).

Each step draws a fresh batch of problems from ``(seed, step)``, so the data is unlimited and the same on
every run; every data-parallel rank takes its rows of that global batch. The weights are saved with
``save_model_weights``, the format the distillation job loads (``checkpoint.teacher`` /
``checkpoint.student_init``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import EvalSettings, OptimConfig
from megatron_tropd.console import configure_console
from megatron_tropd.data import Tokenizer
from megatron_tropd.demo.task import make_problem, noisy_response, teacher_response
from megatron_tropd.model_config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSpec:
    """One model's supervised training."""

    name: str
    model: ModelConfig
    steps: int
    batch_size: int  # sequences per step, over all ranks
    lr: float
    seed: int
    skip_rate: float = 0.0  # > 0 or slip_rate > 0: the noisy writer (the student's data)
    slip_rate: float = 0.0
    # Another task's writer ``(problem, rng) -> response`` and problem source ``rng -> problem`` (both
    # picklable, module level); None: the demo's arithmetic and the skip/slip rates above.
    writer: Callable | None = None
    problem_maker: Callable | None = None
    # The first ``curriculum_steps`` steps draw from ``curriculum_writer`` instead (e.g. the same writer
    # with shorter traces: cheaper steps in which the reasoning tokens are a larger share of the loss).
    curriculum_writer: Callable | None = None
    curriculum_steps: int = 0

    def response(self, problem, rng: random.Random, step: int = 0) -> str:
        if self.curriculum_writer is not None and step < self.curriculum_steps:
            return self.curriculum_writer(problem, rng)
        if self.writer is not None:
            return self.writer(problem, rng)
        if self.skip_rate == 0.0 and self.slip_rate == 0.0:
            return teacher_response(problem)
        return noisy_response(problem, rng, self.skip_rate, self.slip_rate)


def sft_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> RolloutBatch:
    """Prompt + response + EOS per row, right-padded; only the response and EOS labels bear loss."""
    rows = []
    for prompt, response in pairs:
        prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
        rows.append((prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    length = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.int64)
    loss_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, (ids, prompt_length) in enumerate(rows):
        tokens[row, : len(ids)] = torch.tensor(ids)
        loss_mask[row, prompt_length - 1 : len(ids) - 1] = True  # labels t + 1 from the first response token
    return RolloutBatch(tokens, loss_mask, torch.zeros_like(loss_mask), torch.arange(len(rows)))


def _step_pairs(spec: PretrainSpec, step: int) -> list[tuple[str, str]]:
    rng = random.Random(spec.seed * 1_000_003 + step)
    make = spec.problem_maker or make_problem
    problems = [make(rng) for _ in range(spec.batch_size)]
    return [(p.prompt, spec.response(p, rng, step)) for p in problems]


def quiet_worker() -> None:
    """Log progress lines from rank 0 and hide the dependency warnings a demo user cannot act on
    (``console.configure_console``). Call it before Megatron is imported: most of them fire at import."""
    configure_console(fmt="%(asctime)s %(message)s")


def _train_one(spec: PretrainSpec, groups, tokenizer: Tokenizer, out: Path, rank: int) -> tuple[object, list]:
    from megatron_tropd.checkpoint import save_model_weights
    from megatron_tropd.topology import data_parallel_rows
    from megatron_tropd.training import build_student, supervised_step

    per_rank = spec.batch_size // groups.data_parallel
    optim = OptimConfig(
        lr=spec.lr, min_lr=spec.lr / 10, lr_schedule="cosine", warmup_steps=max(1, spec.steps // 20),
        weight_decay=0.01, micro_batch_size=per_rank,
    )  # fmt: skip
    student = build_student(spec.model, optim, groups, spec.steps, spec.seed)
    rows = data_parallel_rows(spec.batch_size, groups.data_parallel, groups.position.dp_rank)
    log, started = [], time.perf_counter()
    for step in range(spec.steps):
        result = supervised_step(student, sft_batch(tokenizer, _step_pairs(spec, step)).rows(rows))
        if rank == 0 and (step % 50 == 0 or step == spec.steps - 1):
            log.append({"step": step, "nll": result.metrics["nll"], "seconds": time.perf_counter() - started})
            logger.info("%s step %d/%d nll %.4f", spec.name, step + 1, spec.steps, result.metrics["nll"])
    save_model_weights(out, student.module, spec.model)
    return student, log


def _accuracy(placed, spec: PretrainSpec, tokenizer: Tokenizer, evaluation: HeldOutEvaluation) -> float:
    """avg@k of a freshly trained model on the held-out benchmark (the same protocol as the loop's)."""
    from megatron_tropd.eval.harness import build_generate
    from megatron_tropd.eval.schema import load_benchmarks
    from megatron_tropd.eval.scoring import evaluate

    benchmarks = load_benchmarks(evaluation.benchmarks)
    generate = build_generate(
        placed, tokenizer, max_new_tokens=evaluation.settings.max_new_tokens, chat_template="none",
        max_batch_size=evaluation.max_batch_size, seed=evaluation.seed,
    )  # fmt: skip
    settings = evaluation.settings
    report = evaluate(
        benchmarks,
        generate,
        settings.samples_per_prompt,
        settings.temperature,
        raw_prompts=settings.raw_prompts,
    )
    return report.average


@dataclass(frozen=True)
class HeldOutEvaluation:
    """How the demo measures held-out accuracy: the runs' ``EvalSettings`` on its benchmark file, with the
    loop's generation batch and seed (so a model's score here equals the runs' step-0 evaluation)."""

    benchmarks: str
    settings: EvalSettings
    max_batch_size: int
    seed: int


def pretrain(
    rank: int, world_size: int, specs: list[PretrainSpec], tokenizer_path: str, outs: list[str],
    evaluation: HeldOutEvaluation,
) -> list[dict]:  # fmt: skip
    """Train each spec on every rank (data parallel), save its weights, and measure its held-out
    accuracy; returns ``{"name", "log", "accuracy"}`` per spec (the logs on rank 0)."""
    quiet_worker()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd.placed import one_model_groups
    from megatron_tropd.runtime import set_seed

    groups = one_model_groups(1, 1, seed=specs[0].seed)
    tokenizer, results = Tokenizer(tokenizer_path), []
    for spec, out in zip(specs, outs, strict=True):
        set_seed(spec.seed)
        model_parallel_cuda_manual_seed(spec.seed)
        student, log = _train_one(spec, groups, tokenizer, Path(out), rank)
        accuracy = _accuracy(student.placed, spec, tokenizer, evaluation)
        logger.info("%s: held-out avg@%d %.3f", spec.name, evaluation.settings.samples_per_prompt, accuracy)
        results.append({"name": spec.name, "log": log, "accuracy": accuracy})
    return results
