"""CPU smoke run of every distillation loss on 2 gloo ranks, vocabulary sharded over TP = 2.

A random teacher/student logits problem (1000-token vocabulary padded to 1008, 8 samples x 64 tokens,
some teacher-prefix and padding tokens) is scored with the vocab-parallel ops exactly as the trainer will
score a rollout batch, then every method's loss and gradient w.r.t. the student's logits shard is
compared with the single-device reference (``ops.reference`` on the full logits, same loss code). The
table shows each method's loss, gradient norm, trust fraction, teacher top-k mass under the student and
the largest difference from the reference; the exit status is 1 when any difference exceeds tolerance.

    python -m megatron_tropd.demo.smoke [--tokens-per-sample 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_tropd.config import METHOD_NAMES, MethodConfig
from megatron_tropd.losses import (
    TokenSignals,
    count_valid_tokens,
    make_method_context,
    microbatch_loss,
    reduce_metrics,
)
from megatron_tropd.ops import agreement_ratio, draw_trust_mask, reference, vocab_parallel
from megatron_tropd.spawn import run_on_ranks

logger = logging.getLogger(__name__)

# Value of the padding columns beyond the true vocabulary: large, so any op that forgot to drop them
# would be visibly wrong.
PADDING_LOGIT = 30.0


@dataclass(frozen=True)
class SmokeProblem:
    """Size and seeds of the random distillation problem."""

    vocab_size: int = 1000
    padded_vocab_size: int = 1008
    num_samples: int = 8
    tokens_per_sample: int = 64
    topk: int = 64
    seed: int = 0
    step: int = 12
    total_steps: int = 20
    dtype: str = "float64"
    tolerance: float = 1e-9


@dataclass
class RolloutBatch:
    """What a rollout + teacher pass would hand to training, as full (unsharded) tensors."""

    teacher_logits: torch.Tensor  # [T, V_padded]
    student_logits: torch.Tensor  # [T, V_padded]
    token_ids: torch.Tensor  # [T] sampled (or teacher-prefix) tokens
    sample_ids: torch.Tensor  # [T] global sample id of each token
    token_index: torch.Tensor  # [T] position of each token within its response
    is_teacher_prefix: torch.Tensor  # [T] bool
    loss_mask: torch.Tensor  # [T] bool


def build_batch(problem: SmokeProblem) -> RolloutBatch:
    """Deterministic from ``problem.seed``, so every rank builds the same batch."""
    gen = torch.Generator().manual_seed(problem.seed)
    dtype = getattr(torch, problem.dtype)
    shape = (problem.num_samples, problem.tokens_per_sample)
    num_tokens = shape[0] * shape[1]
    teacher = 3.0 * torch.randn(num_tokens, problem.vocab_size, generator=gen, dtype=dtype)
    # a student that partly agrees with the teacher: every trust-region regime appears
    student = 0.6 * teacher + 2.5 * torch.randn(num_tokens, problem.vocab_size, generator=gen, dtype=dtype)
    position = torch.arange(shape[1]).expand(shape)  # [B, S]
    # half the samples get a teacher prefix of random length, the last tokens of some samples are padding
    prefix_len = (
        torch.randint(0, shape[1] // 2, (shape[0], 1), generator=gen)
        * (torch.arange(shape[0]) % 2 == 0)[:, None]
    )
    response_len = torch.randint(shape[1] // 2, shape[1] + 1, (shape[0], 1), generator=gen)
    is_prefix = (position < prefix_len).reshape(-1)
    source = torch.where(is_prefix[:, None], teacher, student).softmax(-1)
    padding = torch.full(
        (num_tokens, problem.padded_vocab_size - problem.vocab_size), PADDING_LOGIT, dtype=dtype
    )
    return RolloutBatch(
        teacher_logits=torch.cat([teacher, padding], -1),
        student_logits=torch.cat([student, padding], -1),
        token_ids=torch.multinomial(source, 1, generator=gen).squeeze(-1),
        sample_ids=torch.arange(shape[0]).repeat_interleave(shape[1]),
        token_index=position.reshape(-1),
        is_teacher_prefix=is_prefix,
        loss_mask=(position < response_len).reshape(-1),
    )


@dataclass(frozen=True)
class VocabOps:
    """The three vocab ops, either vocab-parallel (bound to a TP group) or the dense reference."""

    log_probs_at: Callable[..., torch.Tensor]  # (logits, ids [T, m]) -> [T, m], differentiable
    topk: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (logits, k) -> (ids [T, k], log-probs [T, k])
    entropy: Callable[..., torch.Tensor]  # (logits) -> [T]

    @classmethod
    def sharded(cls, tp_group: dist.ProcessGroup, vocab_size: int) -> VocabOps:
        return cls(
            partial(vocab_parallel.vocab_parallel_log_probs_at, tp_group=tp_group, vocab_size=vocab_size),
            partial(vocab_parallel.vocab_parallel_topk, tp_group=tp_group, vocab_size=vocab_size),
            partial(vocab_parallel.vocab_parallel_entropy, tp_group=tp_group, vocab_size=vocab_size),
        )

    @classmethod
    def dense(cls, vocab_size: int) -> VocabOps:
        return cls(
            partial(reference.vocab_parallel_log_probs_at, vocab_size=vocab_size),
            partial(reference.vocab_parallel_topk, vocab_size=vocab_size),
            partial(reference.vocab_parallel_entropy, vocab_size=vocab_size),
        )


def score(
    ops: VocabOps,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    batch: RolloutBatch,
    problem: SmokeProblem,
) -> TokenSignals:
    """The per-token signals of one rollout batch; only the student's log-probs keep a graph."""
    token_ids = batch.token_ids.unsqueeze(-1)  # [T, 1]
    with torch.no_grad():  # scoring time: teacher pass and the old student's statistics
        teacher_ids, lp_teacher_topk = ops.topk(teacher_logits, problem.topk)  # [T, k] each
        lp_teacher = ops.log_probs_at(teacher_logits, token_ids).squeeze(-1)  # [T]
        lp_student_old = ops.log_probs_at(student_logits, token_ids).squeeze(-1)  # [T]
        entropy_student_old = ops.entropy(student_logits)  # [T]
        entropy_teacher = ops.entropy(teacher_logits)  # [T]
    p_trust = agreement_ratio(lp_teacher, lp_student_old)
    trust_mask = draw_trust_mask(
        p_trust, MethodConfig().trust_seed, problem.step, batch.sample_ids, batch.token_index
    )
    # training time: one differentiable gather at the sampled token and the teacher's top-k ids
    lp_student_all = ops.log_probs_at(student_logits, torch.cat([token_ids, teacher_ids], -1))  # [T, 1 + k]
    return TokenSignals(
        lp_student=lp_student_all[:, 0],
        lp_student_old=lp_student_old,
        lp_teacher=lp_teacher,
        lp_student_topk=lp_student_all[:, 1:],
        lp_teacher_topk=lp_teacher_topk,
        entropy_student_old=entropy_student_old,
        entropy_teacher=entropy_teacher,
        trust_mask=trust_mask,
        is_teacher_prefix=batch.is_teacher_prefix,
        loss_mask=batch.loss_mask,
    )


@dataclass
class MethodRow:
    """One line of the smoke table."""

    method: str
    loss: float
    grad_norm: float
    trust_fraction: float
    topk_mass: float
    max_abs_diff: float  # max over |loss - reference| and every |d loss / d logits - reference|


def evaluate_method(name: str, signals: TokenSignals, logits: torch.Tensor, problem: SmokeProblem):
    """Loss, gradient w.r.t. ``logits`` and reduced metrics of one method on one batch (one microbatch)."""
    config = MethodConfig(name=name, topk=problem.topk)
    config.validate()
    context = make_method_context(config, signals, problem.step, problem.total_steps)
    loss, metrics = microbatch_loss(signals, config, context, count_valid_tokens(signals.loss_mask))
    (grad,) = torch.autograd.grad(loss, [logits], retain_graph=True)  # the signals' graph serves every method
    return loss.detach(), grad, reduce_metrics([metrics])


def _smoke_rank(rank: int, world_size: int, problem: SmokeProblem) -> list[dict]:
    """One TP rank: score its vocabulary shard, run every method, compare with the dense reference."""
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tp_group = dist.group.WORLD  # the whole (2-rank) world is one TP group in this demo
    batch = build_batch(problem)
    local_size = problem.padded_vocab_size // world_size
    columns = slice(rank * local_size, (rank + 1) * local_size)
    student_shard = batch.student_logits[:, columns].clone().requires_grad_()  # [T, V_local]
    sharded = score(
        VocabOps.sharded(tp_group, problem.vocab_size),
        student_shard,
        batch.teacher_logits[:, columns],
        batch,
        problem,
    )
    student_full = batch.student_logits.clone().requires_grad_()  # [T, V_padded]
    dense = score(VocabOps.dense(problem.vocab_size), student_full, batch.teacher_logits, batch, problem)
    rows = []
    for name in METHOD_NAMES:
        loss, grad, metrics = evaluate_method(name, sharded, student_shard, problem)
        ref_loss, ref_grad, _ = evaluate_method(name, dense, student_full, problem)
        grad_sq = grad.to(torch.float64).square().sum()
        dist.all_reduce(grad_sq, group=tp_group)  # shards hold disjoint columns: norms add in squares
        diff = torch.maximum((loss - ref_loss).abs(), (grad - ref_grad[:, columns]).abs().max()).to(
            torch.float64
        )
        dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=tp_group)
        row = MethodRow(
            name,
            loss.item(),
            math.sqrt(grad_sq.item()),
            metrics["trust_fraction"],
            metrics["teacher_topk_mass"],
            diff.item(),
        )
        rows.append(asdict(row))
        if rank == 0:
            logger.info("%-15s loss %.6f  max |diff| %.2e", name, row.loss, row.max_abs_diff)
    return rows


def format_table(rows: list[dict]) -> str:
    """The smoke results as a fixed-width text table."""
    columns = ("method", "loss", "grad norm", "trust frac", "top-k mass", "max |diff|")
    header = f"{columns[0]:<15}" + "".join(f" {name:>12}" for name in columns[1:])
    lines = [header, "-" * len(header)]
    for row in rows:
        numbers = (row["loss"], row["grad_norm"], row["trust_fraction"], row["topk_mass"])
        line = f"{row['method']:<15}" + "".join(f" {value:>12.6f}" for value in numbers)
        lines.append(line + f" {row['max_abs_diff']:>12.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> SmokeProblem:
    defaults = SmokeProblem()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--padded-vocab-size", type=int, default=defaults.padded_vocab_size)
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--tokens-per-sample", type=int, default=defaults.tokens_per_sample)
    parser.add_argument("--topk", type=int, default=defaults.topk)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", choices=("float64", "float32"), default=defaults.dtype)
    parser.add_argument(
        "--tolerance", type=float, default=None, help="default: 1e-9 (float64), 1e-4 (float32)"
    )
    args = parser.parse_args(argv)
    tolerance = args.tolerance if args.tolerance is not None else (1e-9 if args.dtype == "float64" else 1e-4)
    problem = SmokeProblem(
        vocab_size=args.vocab_size,
        padded_vocab_size=args.padded_vocab_size,
        num_samples=args.num_samples,
        tokens_per_sample=args.tokens_per_sample,
        topk=args.topk,
        seed=args.seed,
        dtype=args.dtype,
        tolerance=tolerance,
    )
    if problem.padded_vocab_size % 2 or problem.padded_vocab_size < problem.vocab_size:
        parser.error("--padded-vocab-size must be even (TP = 2) and at least --vocab-size")
    if not 0 < problem.topk <= problem.vocab_size:
        parser.error(f"--topk must lie in [1, vocab size {problem.vocab_size}]")
    if problem.tokens_per_sample < 2 or problem.num_samples < 1:
        parser.error("need at least one sample of at least two tokens")
    return problem


def main(argv: list[str] | None = None) -> int:
    """Run the smoke test; print the table; 0 when every method matches the reference within tolerance."""
    problem = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    num_tokens = problem.num_samples * problem.tokens_per_sample
    logger.info(
        "smoke: %d tokens, vocab %d (padded %d) sharded over TP = 2 gloo ranks, top-%d, %s",
        num_tokens,
        problem.vocab_size,
        problem.padded_vocab_size,
        problem.topk,
        problem.dtype,
    )
    # the worker must be pickled by its module path, also when this file runs as __main__
    worker = importlib.import_module("megatron_tropd.demo.smoke")._smoke_rank
    rows = run_on_ranks(worker, 2, problem)[0]
    print(format_table(rows))
    failed = [
        r["method"]
        for r in rows
        if not math.isfinite(r["max_abs_diff"]) or r["max_abs_diff"] > problem.tolerance
    ]
    if failed:
        logger.error(
            "vocab-parallel result differs from the reference beyond %.1e: %s", problem.tolerance, failed
        )
        return 1
    logger.info("all %d methods match the single-device reference within %.1e", len(rows), problem.tolerance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
