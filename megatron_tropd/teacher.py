"""Scoring: the frozen teacher's signals and the generating student's old log-probs for a rollout batch.

Each model runs forward-only on its own layout through Megatron's pipeline schedule, and the vocabulary
never leaves its shards: the per-token signals come from the vocab-parallel ops on the last stage's
TP-sharded logits. The teacher's results are then moved to the student ranks that train on those
sequences (``move_rows``), since the two layouts split the batch over data-parallel ranks differently.
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
from megatron_tropd.topology import ModelGroups, grid_position

SignalFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def build_teacher(model_config, groups: ModelGroups, *, seed: int, checkpoint: str = "") -> torch.nn.Module:
    """This rank's frozen teacher stage on its own layout: weights read-only from ``checkpoint`` when
    given (else drawn from ``seed``), no gradients, eval mode; the optimizer never sees it."""
    from megatron_tropd.checkpoint import load_model_weights
    from megatron_tropd.models import build_gpt_model

    teacher = build_gpt_model(
        model_config, groups.pg_collection, pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage, tensor_parallel_size=groups.layout.tensor_parallel,
        pipeline_parallel_size=groups.layout.pipeline_parallel, seed=None if checkpoint else seed,
    )  # fmt: skip
    if checkpoint:
        load_model_weights(checkpoint, teacher, model_config)
    return teacher.requires_grad_(False).eval()


def data_parallel_rows(num_rows: int, data_parallel: int, dp_rank: int) -> slice:
    """The contiguous rows of the global batch that data-parallel rank ``dp_rank`` owns."""
    if num_rows % data_parallel:
        raise ValueError(
            f"the global batch of {num_rows} sequences does not split over {data_parallel} data-parallel "
            "ranks; make the number of rollouts per step a multiple of every model's data-parallel size"
        )
    per_rank = num_rows // data_parallel
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)


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
    model: torch.nn.Module,
    groups: ModelGroups,
    tokens: torch.Tensor,
    micro_batch_size: int,
    signal_fn: SignalFn,
) -> dict[str, torch.Tensor] | None:
    """Run ``tokens [n, S]`` forward-only and apply ``signal_fn(logits_shard, labels)`` per microbatch.

    Returns the concatenated per-row results on the last pipeline stage, None on the other stages.
    """
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    microbatches = list(zip(tokens.split(micro_batch_size), labels.split(micro_batch_size), strict=True))
    outputs = run_microbatches(
        model, groups, partial(_forward_step, signal_fn=signal_fn), microbatches,
        seq_length=tokens.shape[1], micro_batch_size=micro_batch_size, forward_only=True,
        collect_non_loss_data=True,
    )  # fmt: skip
    if not groups.is_last_stage:
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


@dataclass(frozen=True)
class RowHolder:
    """Rows ``[start, stop)`` of the global batch live on global rank ``rank``."""

    rank: int
    start: int
    stop: int


def last_stage_holders(groups: ModelGroups, num_rows: int, world_size: int, first_tp_only: bool):
    """Which ranks hold which rows of per-sequence results on a model's last pipeline stage."""
    holders = []
    for rank in range(world_size):
        position = grid_position(rank, groups.layout, groups.data_parallel)
        if position.pp_rank != groups.layout.pipeline_parallel - 1 or (first_tp_only and position.tp_rank):
            continue
        rows = data_parallel_rows(num_rows, groups.data_parallel, position.dp_rank)
        holders.append(RowHolder(rank, rows.start, rows.stop))
    return holders


def _transport(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor


def move_rows(
    local: dict[str, torch.Tensor] | None,
    senders: list[RowHolder],
    receivers: list[RowHolder],
    template: dict[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> dict[str, torch.Tensor] | None:
    """Send per-row results from the ranks that computed them to the ranks that need them.

    ``template`` gives each field's per-row shape and dtype so receivers can allocate. Overlapping row
    ranges travel point to point (one message per field and sender/receiver pair); a rank that is both
    sender and receiver copies locally. Returns this rank's received rows, or None if it receives none.
    """
    me = dist.get_rank()
    mine = next((r for r in receivers if r.rank == me), None)
    out = None
    if mine is not None:
        out = {
            name: torch.empty(
                mine.stop - mine.start,
                *shape,
                dtype=_transport(torch.empty(0, dtype=dtype)).dtype,
                device=device,
            )
            for name, (shape, dtype) in template.items()
        }
    operations = []
    for sender in senders:
        for receiver in receivers:
            start, stop = max(sender.start, receiver.start), min(sender.stop, receiver.stop)
            if start >= stop or me not in (sender.rank, receiver.rank):
                continue
            for name in sorted(template):
                if sender.rank == me:
                    payload = _transport(local[name][start - sender.start : stop - sender.start]).contiguous()
                    if receiver.rank == me:
                        out[name][start - receiver.start : stop - receiver.start] = payload
                        continue
                    operations.append(dist.P2POp(dist.isend, payload, receiver.rank))
                else:
                    operations.append(
                        dist.P2POp(
                            dist.irecv, out[name][start - receiver.start : stop - receiver.start], sender.rank
                        )
                    )
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    if out is None:
        return None
    return {name: tensor.to(template[name][1]) for name, tensor in out.items()}


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
    batch: RolloutBatch,
    student_model: torch.nn.Module,
    student_groups: ModelGroups,
    teacher_model: torch.nn.Module,
    teacher_groups: ModelGroups,
    spec: ScoringSpec,
    step: int,
) -> RolloutBatch:
    """Score the global rollout ``batch`` (the same on every rank); return this student rank's rows.

    On the student's last pipeline stage the rows carry every signal (teacher log-prob, top-k, entropy,
    old student log-prob and entropy, trust mask); on other stages they carry tokens and masks only.
    """
    num_rows, device = batch.num_sequences, batch.tokens.device
    teacher_rows = data_parallel_rows(num_rows, teacher_groups.data_parallel, teacher_groups.position.dp_rank)
    teacher_fn = teacher_signal_fn(
        teacher_groups.tp_group, spec.vocab_size, spec.topk, spec.with_teacher_entropy
    )
    teacher_out = forward_signals(
        teacher_model, teacher_groups, batch.tokens[teacher_rows], spec.micro_batch_size, teacher_fn
    )
    student_rows = data_parallel_rows(num_rows, student_groups.data_parallel, student_groups.position.dp_rank)
    mine = batch.rows(student_rows)
    student_fn = student_signal_fn(student_groups.tp_group, spec.vocab_size)
    student_out = forward_signals(
        student_model, student_groups, mine.tokens, spec.micro_batch_size, student_fn
    )
    world_size = dist.get_world_size()
    teacher_for_me = move_rows(
        teacher_out,
        senders=last_stage_holders(teacher_groups, num_rows, world_size, first_tp_only=True),
        receivers=last_stage_holders(student_groups, num_rows, world_size, first_tp_only=False),
        template=_teacher_template(spec, batch.seq_length),
        device=device,
    )
    if student_out is None:
        return mine
    mine = mine.with_signals(**teacher_for_me, **student_out)
    return mine.with_signals(trust_mask=draw_batch_trust_mask(mine, spec.trust_seed, step))
