"""Scoring: the frozen teacher's signals and the generating student's old log-probs for a rollout batch.

Each model runs forward-only on its own layout through Megatron's pipeline schedule, and the vocabulary
never leaves its shards: the per-token signals come from the vocab-parallel ops on the last stage's
TP-sharded logits. The teacher's results are then moved to the student ranks that train on those
sequences (``transfer``), since the two layouts split the batch over data-parallel ranks differently, and
the trust mask is drawn there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import MethodConfig
from megatron_tropd.methods import method_spec
from megatron_tropd.ops import (
    agreement_ratio,
    draw_trust_mask,
    vocab_parallel_token_stats,
    vocab_parallel_topk,
)
from megatron_tropd.pipeline import run_microbatches
from megatron_tropd.placed import PlacedModel
from megatron_tropd.topology import ModelGroups
from megatron_tropd.transfer import last_stage_holders, move_rows, plan_row_transfer

SignalFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _forward_step(data_iterator, model, signal_fn: SignalFn):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = model(tokens, position_ids, None)

    def collect(output_tensor, non_loss_data=False):
        with torch.no_grad():
            return signal_fn(output_tensor, labels)

    return output, collect


@torch.no_grad()
def forward_signals(
    placed: PlacedModel, tokens: torch.Tensor, micro_batch_size: int, signal_fn: SignalFn
) -> dict[str, torch.Tensor] | None:
    """Run ``tokens [n, S]`` forward-only and apply ``signal_fn(logits_shard, labels)`` per microbatch.

    Returns the concatenated per-row results on the last pipeline stage, None on the other stages.
    """
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    microbatches = list(zip(tokens.split(micro_batch_size), labels.split(micro_batch_size), strict=True))
    outputs = run_microbatches(
        placed, partial(_forward_step, signal_fn=signal_fn), microbatches,
        seq_length=tokens.shape[1], micro_batch_size=micro_batch_size, forward_only=True,
        collect_non_loss_data=True,
    )  # fmt: skip
    if not placed.is_last_stage:
        return None
    return {name: torch.cat([out[name] for out in outputs]) for name in outputs[0]}


def teacher_signal_fn(tp_group, vocab_size: int, topk: int, with_entropy: bool) -> SignalFn:
    """Teacher log-prob of each label, global top-k ids and log-probs, and (optionally) the entropy."""

    def signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        topk_ids, topk_logprobs = vocab_parallel_topk(logits, topk, tp_group, vocab_size)
        lp, entropy = vocab_parallel_token_stats(
            logits, labels.unsqueeze(-1), tp_group, vocab_size, with_entropy
        )
        out = {
            "lp_teacher": lp.squeeze(-1).float(),
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs.float(),
        }
        if with_entropy:
            out["entropy_teacher"] = entropy.float()
        return out

    return signals


def student_signal_fn(tp_group, vocab_size: int) -> SignalFn:
    """The generating student's log-prob of each label and its entropy (scoring-time, no grad)."""

    def signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        lp, entropy = vocab_parallel_token_stats(logits, labels.unsqueeze(-1), tp_group, vocab_size, True)
        return {"lp_student_old": lp.squeeze(-1).float(), "entropy_student_old": entropy.float()}

    return signals


@dataclass
class ScoringSpec:
    """What scoring computes; shared by every rank of the job."""

    vocab_size: int  # true vocabulary, shared by teacher and student
    topk: int
    with_teacher_entropy: bool
    micro_batch_size: int
    trust_seed: int

    @classmethod
    def for_method(cls, vocab_size: int, method: MethodConfig, micro_batch_size: int) -> ScoringSpec:
        """What ``method`` needs scored, from its ``methods.METHOD_SPECS`` entry: the teacher's entropy only
        where its loss reads it; top-k and the trust mask always (the metrics read them too)."""
        needs = method_spec(method.name)
        return cls(vocab_size, method.topk, needs.teacher_entropy, micro_batch_size, method.trust_seed)


def _teacher_template(spec: ScoringSpec, seq_length: int):
    per_token = ((seq_length,), torch.float32)
    template = {
        "lp_teacher": per_token,
        "topk_ids": ((seq_length, spec.topk), torch.int64),
        "topk_logprobs": ((seq_length, spec.topk), torch.float32),
    }
    if spec.with_teacher_entropy:
        template["entropy_teacher"] = per_token
    return template


def draw_batch_trust_mask(batch: RolloutBatch, seed: int, step: int) -> torch.Tensor:
    """``M ~ Bernoulli(min(pi_T / pi_S_old, 1))`` per label position ``[n, S]``, keyed by global ids."""
    p_trust = agreement_ratio(batch.lp_teacher, batch.lp_student_old)
    positions = torch.arange(batch.seq_length, device=p_trust.device).expand_as(p_trust)
    sample_ids = batch.sample_ids.to(p_trust.device).unsqueeze(-1).expand_as(p_trust)
    return draw_trust_mask(p_trust, seed, step, sample_ids, positions)


def score_batch(
    batch: RolloutBatch, student: PlacedModel, teacher: PlacedModel, spec: ScoringSpec, step: int
) -> RolloutBatch:
    """Score the global rollout ``batch`` (the same on every rank); return this student rank's rows.

    Four calls: the teacher's signals on its rows, the generating student's on its rows, the teacher's
    moved onto the student's layout, the trust draw. On the student's last pipeline stage the rows carry
    every signal (teacher log-prob, top-k, entropy, old student log-prob and entropy, trust mask); on
    other stages they carry tokens and masks only.
    """
    teacher_out = teacher_signals(batch, teacher, spec)
    mine = batch.rows(student.rows(batch.num_sequences))
    student_fn = student_signal_fn(student.tp_group, spec.vocab_size)
    student_out = forward_signals(student, mine.tokens, spec.micro_batch_size, student_fn)
    teacher_for_me = teacher_to_student_layout(teacher_out, batch, teacher.groups, student.groups, spec)
    if student_out is None:
        return mine
    mine = mine.with_signals(**teacher_for_me, **student_out)
    return mine.with_signals(trust_mask=draw_batch_trust_mask(mine, spec.trust_seed, step))


def teacher_signals(
    batch: RolloutBatch, teacher: PlacedModel, spec: ScoringSpec
) -> dict[str, torch.Tensor] | None:
    """The teacher's signals for its data-parallel rows of ``batch`` (None off its last stage)."""
    signal_fn = teacher_signal_fn(teacher.tp_group, spec.vocab_size, spec.topk, spec.with_teacher_entropy)
    tokens = batch.tokens[teacher.rows(batch.num_sequences)]
    return forward_signals(teacher, tokens, spec.micro_batch_size, signal_fn)


def teacher_to_student_layout(
    teacher_out: dict[str, torch.Tensor] | None,
    batch: RolloutBatch,
    teacher_groups: ModelGroups,
    student_groups: ModelGroups,
    spec: ScoringSpec,
) -> dict[str, torch.Tensor] | None:
    """The teacher's per-row signals, moved from its last stage to the student ranks that train on them."""
    num_rows, world_size = batch.num_sequences, dist.get_world_size()
    plan = plan_row_transfer(
        senders=last_stage_holders(teacher_groups, num_rows, world_size, first_tp_only=True),
        receivers=last_stage_holders(student_groups, num_rows, world_size, first_tp_only=False),
    )
    return move_rows(teacher_out, plan, _teacher_template(spec, batch.seq_length), batch.tokens.device)
