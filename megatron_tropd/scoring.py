"""Scoring: the frozen teacher's signals and the generating student's old log-probs for a rollout batch.

Each model runs forward-only on its own layout through Megatron's pipeline schedule, and the vocabulary
never leaves its shards: the per-token signals come from the vocab-parallel ops on the last stage's
TP-sharded logits. The teacher's results are then moved to the student ranks that train on those
sequences (``transfer``), since the two layouts split the batch over data-parallel ranks differently, and
the trust mask is drawn there.

With the hidden teacher payload (``ScoringSpec.teacher_hidden_size``) the teacher's last stage also
returns its final hidden states (the input of its output layer) for every token, moved by the same row
transport; ``teacher_weight_for_student`` gives each student rank, once per job, the teacher's
output-layer rows of its vocabulary partition, so training can recompute the teacher's full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
from megatron_tropd.packing import packed_microbatches, sequence_lengths, unpack_rows
from megatron_tropd.pipeline import run_microbatches
from megatron_tropd.placed import PlacedModel
from megatron_tropd.topology import ModelGroups
from megatron_tropd.transfer import into_subset, last_stage_holders, move_rows, plan_row_transfer

SignalFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _forward_step(data_iterator, model, signal_fn: SignalFn):
    tokens, labels, position_ids, packed_seq_params = next(data_iterator)
    packed = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
    output = model(tokens, position_ids, None, **packed)

    def collect(output_tensor, non_loss_data=False):
        with torch.no_grad():
            return signal_fn(output_tensor, labels)

    return output, collect


def _padded_microbatches(tokens: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> list:
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    splits = zip(tokens.split(micro_batch_size), labels.split(micro_batch_size), strict=True)
    return [(t, lab, positions[: t.shape[0]], None) for t, lab in splits]


@torch.no_grad()
def forward_signals(
    placed: PlacedModel,
    tokens: torch.Tensor,
    micro_batch_size: int,
    signal_fn: SignalFn,
    *,
    lengths: Sequence[int] | None = None,
    max_tokens: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Run ``tokens [n, S]`` forward-only and apply ``signal_fn(logits_shard, labels)`` per microbatch.

    With ``max_tokens`` (and each row's ``lengths``) the rows run packed, at most ``max_tokens`` tokens a
    microbatch (``packing.py``), else in microbatches of ``micro_batch_size`` padded rows. Returns the
    per-row results ``[n, S, ...]`` on the last pipeline stage (zeros past a packed row's end), None on
    the other stages.
    """
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    if max_tokens and lengths is not None:
        equal_shapes = placed.groups.layout.pipeline_parallel > 1
        packs = packed_microbatches({"tokens": tokens, "labels": labels}, lengths, max_tokens, equal_shapes)
        items = [
            (p.fields["tokens"], p.fields["labels"], p.position_ids, p.packed_seq_params()) for p in packs
        ]
        seq_length, rows_per_microbatch = max(p.num_tokens for p in packs), 1
    else:
        items = _padded_microbatches(tokens, labels, micro_batch_size)
        seq_length, rows_per_microbatch = tokens.shape[1], micro_batch_size
    outputs = run_microbatches(
        placed, partial(_forward_step, signal_fn=signal_fn), items, seq_length=seq_length,
        micro_batch_size=rows_per_microbatch, forward_only=True, collect_non_loss_data=True,
    )  # fmt: skip
    if not placed.is_last_stage:
        return None
    if max_tokens and lengths is not None:
        return unpack_rows(outputs, packs, tokens.shape[0], tokens.shape[1])
    return {name: torch.cat([out[name] for out in outputs]) for name in outputs[0]}


class HiddenCapture:
    """The input of a model stage's output layer (its final hidden states after the final norm), kept
    by a forward pre-hook from the latest forward pass; ``remove`` takes the hook off."""

    def __init__(self, stage: torch.nn.Module):
        self._hidden: torch.Tensor | None = None
        self._handle = stage.output_layer.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self._hidden = args[0]  # [s, b, h]: GPTModel passes the hidden states positionally

    def take(self, seq_length: int) -> torch.Tensor:
        """The latest hidden states as fp32 ``[b, s, h]``, checked against the logits' ``seq_length``."""
        hidden, self._hidden = self._hidden, None
        if hidden is None or hidden.shape[0] != seq_length:
            shape = None if hidden is None else tuple(hidden.shape)
            raise RuntimeError(
                f"the teacher's output layer saw hidden states {shape}, not [{seq_length}, b, h]: the hidden "
                "payload needs the whole sequence on each TP rank (no sequence parallelism)"
            )
        return hidden.transpose(0, 1).float().contiguous()

    def remove(self) -> None:
        self._handle.remove()


def teacher_signal_fn(
    tp_group, vocab_size: int, topk: int, with_entropy: bool, hidden: HiddenCapture | None = None
) -> SignalFn:
    """Teacher log-prob of each label, global top-k ids and log-probs, (optionally) the entropy, and with
    ``hidden`` the final hidden states ``teacher_hidden [b, s, H_t]`` of the same forward pass."""

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
        if hidden is not None:
            out["teacher_hidden"] = hidden.take(logits.shape[1])
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
    max_tokens: int = 0
    """Packed microbatches of at most this many tokens, rows split over data-parallel ranks by tokens;
    0: ``micro_batch_size`` padded rows, equal row counts."""
    teacher_hidden_size: int = 0
    """The teacher's hidden size H_t when its final hidden states are scored (the hidden payload,
    ``teacher_hidden [N, S, H_t]``); 0: not scored."""

    @classmethod
    def for_method(
        cls,
        vocab_size: int,
        method: MethodConfig,
        micro_batch_size: int,
        max_tokens: int = 0,
        teacher_hidden_size: int = 0,
    ) -> ScoringSpec:
        """What ``method`` needs scored, from its ``methods.METHOD_SPECS`` entry: the teacher's entropy only
        where its loss reads it; top-k and the trust mask always (the metrics read them too); the
        teacher's hidden states (``teacher_hidden_size``: the teacher's ``hidden_size``) only with the
        hidden payload (``MethodConfig.hidden_payload``)."""
        needs = method_spec(method.name)
        if method.hidden_payload and teacher_hidden_size <= 0:
            raise ValueError(
                f"method {method.name!r} with the hidden teacher payload scores the teacher's final hidden "
                "states: pass teacher_hidden_size = the teacher's model hidden_size"
            )
        return cls(
            vocab_size, method.topk, needs.teacher_entropy, micro_batch_size, method.trust_seed, max_tokens,
            teacher_hidden_size if method.hidden_payload else 0,
        )  # fmt: skip

    def row_lengths(self, batch: RolloutBatch) -> list[int] | None:
        """Each row's token count when packing (it splits rows over ranks and into microbatches)."""
        return sequence_lengths(batch) if self.max_tokens else None


def _teacher_template(spec: ScoringSpec, seq_length: int):
    per_token = ((seq_length,), torch.float32)
    template = {
        "lp_teacher": per_token,
        "topk_ids": ((seq_length, spec.topk), torch.int64),
        "topk_logprobs": ((seq_length, spec.topk), torch.float32),
    }
    if spec.with_teacher_entropy:
        template["entropy_teacher"] = per_token
    if spec.teacher_hidden_size:
        template["teacher_hidden"] = ((seq_length, spec.teacher_hidden_size), torch.float32)
    return template


def draw_batch_trust_mask(batch: RolloutBatch, seed: int, step: int) -> torch.Tensor:
    """``M ~ Bernoulli(min(pi_T / pi_S_old, 1))`` per label position ``[n, S]``, keyed by global ids."""
    p_trust = agreement_ratio(batch.lp_teacher, batch.lp_student_old)
    positions = torch.arange(batch.seq_length, device=p_trust.device).expand_as(p_trust)
    sample_ids = batch.sample_ids.to(p_trust.device).unsqueeze(-1).expand_as(p_trust)
    return draw_trust_mask(p_trust, seed, step, sample_ids, positions)


@dataclass(frozen=True)
class RoutedTeachers:
    """Several teachers, each scoring only the rows routed to it."""

    teachers: dict[str, PlacedModel]
    routes: list[str]
    """The teacher of each row of the global rollout batch."""

    def subset(self, name: str) -> list[int]:
        """The global rows routed to ``name``, ascending."""
        return [row for row, route in enumerate(self.routes) if route == name]


def score_batch(
    batch: RolloutBatch,
    student: PlacedModel,
    teacher: PlacedModel | RoutedTeachers,
    spec: ScoringSpec,
    step: int,
) -> RolloutBatch:
    """Score the global rollout ``batch`` (the same on every rank); return this student rank's rows.

    Four calls: the teacher's signals on its rows, the teacher's moved onto the student's layout, the
    generating student's on its rows, the trust draw. With ``RoutedTeachers`` each teacher scores the
    rows routed to it, on its own layout, and the rows come together on the student's ranks. On the
    student's last pipeline stage the rows carry every signal (teacher log-prob, top-k, entropy, old
    student log-prob and entropy, trust mask); on other stages they carry tokens and masks only.
    """
    lengths = spec.row_lengths(batch)
    if isinstance(teacher, RoutedTeachers):
        teacher_for_me = routed_teacher_signals(batch, teacher, student.groups, spec, lengths)
        return _with_student_signals(batch, student, spec, step, lengths, teacher_for_me)
    teacher_out = teacher_signals(batch, teacher, spec, lengths)
    teacher_for_me = teacher_to_student_layout(
        teacher_out, batch, teacher.groups, student.groups, spec, lengths
    )
    return _with_student_signals(batch, student, spec, step, lengths, teacher_for_me)


def _with_student_signals(
    batch: RolloutBatch, student: PlacedModel, spec: ScoringSpec, step: int, lengths, teacher_for_me
) -> RolloutBatch:
    """This student rank's rows with the teacher's signals, its own old log-probs and the trust mask."""
    rows = student.rows(batch.num_sequences, lengths)
    mine = batch.rows(rows)
    student_fn = student_signal_fn(student.tp_group, spec.vocab_size)
    student_out = forward_signals(
        student, mine.tokens, spec.micro_batch_size, student_fn,
        lengths=lengths[rows] if lengths else None, max_tokens=spec.max_tokens,
    )  # fmt: skip
    if student_out is None:
        return mine
    mine = mine.with_signals(**teacher_for_me, **student_out)
    return mine.with_signals(trust_mask=draw_batch_trust_mask(mine, spec.trust_seed, step))


def _hidden_capture(teacher: PlacedModel, spec: ScoringSpec) -> HiddenCapture | None:
    """A capture of the teacher's final hidden states on its last stage, with the hidden payload."""
    if not (spec.teacher_hidden_size and teacher.is_last_stage):
        return None
    if teacher.config.hidden_size != spec.teacher_hidden_size:
        raise ValueError(
            f"ScoringSpec.teacher_hidden_size = {spec.teacher_hidden_size} but the teacher's hidden_size "
            f"is {teacher.config.hidden_size}"
        )
    return HiddenCapture(teacher.stage)


def teacher_signals(
    batch: RolloutBatch, teacher: PlacedModel, spec: ScoringSpec, lengths: list[int] | None = None
) -> dict[str, torch.Tensor] | None:
    """The teacher's signals for its data-parallel rows of ``batch`` (None off its last stage);
    ``lengths``: each row's token count, when packing. With ``spec.teacher_hidden_size`` the signals
    include ``teacher_hidden``, captured from the teacher stage's output layer during these passes only."""
    hidden = _hidden_capture(teacher, spec)
    signal_fn = teacher_signal_fn(
        teacher.tp_group, spec.vocab_size, spec.topk, spec.with_teacher_entropy, hidden
    )
    rows = teacher.rows(batch.num_sequences, lengths)
    try:
        return forward_signals(
            teacher, batch.tokens[rows], spec.micro_batch_size, signal_fn,
            lengths=lengths[rows] if lengths else None, max_tokens=spec.max_tokens,
        )  # fmt: skip
    finally:
        if hidden is not None:  # generation runs the same stage: it must not keep capturing
            hidden.remove()


def teacher_to_student_layout(
    teacher_out: dict[str, torch.Tensor] | None,
    batch: RolloutBatch,
    teacher_groups: ModelGroups,
    student_groups: ModelGroups,
    spec: ScoringSpec,
    lengths: list[int] | None = None,
) -> dict[str, torch.Tensor] | None:
    """The teacher's per-row signals, moved from its last stage to the student ranks that train on them
    (``lengths``: each row's token count, when ranks split rows by tokens)."""
    num_rows, world_size = batch.num_sequences, dist.get_world_size()
    plan = plan_row_transfer(
        senders=last_stage_holders(teacher_groups, num_rows, world_size, first_tp_only=True, lengths=lengths),
        receivers=last_stage_holders(
            student_groups, num_rows, world_size, first_tp_only=False, lengths=lengths
        ),
    )
    return move_rows(teacher_out, plan, _teacher_template(spec, batch.seq_length), batch.tokens.device)


def routed_teacher_signals(
    batch: RolloutBatch,
    routed: RoutedTeachers,
    student_groups: ModelGroups,
    spec: ScoringSpec,
    lengths: list[int] | None,
) -> dict[str, torch.Tensor] | None:
    """Each teacher's signals for the rows routed to it, gathered on the student ranks that train on
    them (this rank's rows, every field; None off the student's last stage). Collective: every rank takes
    the teachers in the same (sorted) order."""
    world_size = dist.get_world_size()
    receivers = last_stage_holders(student_groups, batch.num_sequences, world_size, False, lengths=lengths)
    me = next((h for h in receivers if h.rank == dist.get_rank()), None)
    template = _teacher_template(spec, batch.seq_length)
    if spec.teacher_hidden_size:  # which teacher's hidden states each row holds
        template["teacher_index"] = ((batch.seq_length,), torch.int64)
    out = None
    if me is not None:
        out = {
            name: torch.zeros(me.stop - me.start, *shape, dtype=dtype, device=batch.tokens.device)
            for name, (shape, dtype) in template.items()
        }
    for index, name in enumerate(sorted(routed.teachers)):
        subset = routed.subset(name)
        if not subset:
            continue
        teacher = routed.teachers[name]
        received = _one_teacher_subset(batch, subset, teacher, receivers, _spec_for(spec, teacher))
        if out is not None and received is not None:
            local = torch.tensor(subset, device=batch.tokens.device)
            local = local[(local >= me.start) & (local < me.stop)] - me.start
            for field, value in received.items():
                out[field][local, ..., : value.shape[-1]] = value  # hidden: the teacher's own width
            if "teacher_index" in out:
                out["teacher_index"][local] = index
    return out


def _spec_for(spec: ScoringSpec, teacher: PlacedModel) -> ScoringSpec:
    """``spec`` for one of several teachers: with the hidden payload, its own hidden size (the rows on
    the student's side are as wide as the widest teacher)."""
    if not spec.teacher_hidden_size:
        return spec
    return replace(spec, teacher_hidden_size=teacher.config.hidden_size)


def _one_teacher_subset(batch, subset: list[int], teacher: PlacedModel, receivers, spec: ScoringSpec):
    """One teacher scores the global rows ``subset`` (split unevenly over its replicas by tokens) and
    sends each student rank the ones it holds, in ascending order."""
    sub = batch.rows(torch.tensor(subset, device=batch.tokens.device))
    sub_lengths = sequence_lengths(sub)
    rows = teacher.rows(len(subset), sub_lengths, uneven=True)
    hidden = _hidden_capture(teacher, spec)
    signal_fn = teacher_signal_fn(
        teacher.tp_group, spec.vocab_size, spec.topk, spec.with_teacher_entropy, hidden
    )
    signals = None
    try:
        if rows.stop > rows.start:  # a replica without rows runs nothing (its TP and PP ranks agree)
            # Unpacked, one row a microbatch: a replica's share need not divide any micro_batch_size.
            signals = forward_signals(
                teacher, sub.tokens[rows], 1, signal_fn,
                lengths=sub_lengths[rows] if spec.max_tokens else None, max_tokens=spec.max_tokens,
            )  # fmt: skip
    finally:
        if hidden is not None:  # generation runs the same stage: it must not keep capturing
            hidden.remove()
    world_size = dist.get_world_size()
    senders = last_stage_holders(teacher.groups, len(subset), world_size, True, sub_lengths, uneven=True)
    plan = plan_row_transfer(senders=senders, receivers=into_subset(receivers, subset))
    return move_rows(signals, plan, _teacher_template(spec, batch.seq_length), batch.tokens.device)


def per_teacher_metrics(
    scored: RolloutBatch, routes: list[str], names: list[str], groups: ModelGroups
) -> dict[str, float]:
    """Per teacher, over the loss-bearing tokens of the rows routed to it (``routes``: this rank's rows):
    ``teacher/<name>/trust_fraction`` (tokens inside the trust region), ``.../outlier_share`` (outside
    it), ``.../reward`` (mean ``log pi_T - log pi_S_old``, OPD's per-token reward) and ``.../rollouts``.
    Summed over the student's data-parallel ranks; computed on its last stage (empty elsewhere)."""
    if not groups.is_last_stage:
        return {}
    device = scored.tokens.device
    sums = torch.zeros(len(names), 4, dtype=torch.float64, device=device)  # tokens, trusted, reward, rows
    for index, name in enumerate(names):
        rows = torch.tensor([route == name for route in routes], dtype=torch.bool, device=device)
        mask = scored.loss_mask & rows.unsqueeze(-1)
        reward = (scored.lp_teacher - scored.lp_student_old).double()
        sums[index, 0] = mask.sum()
        sums[index, 1] = (scored.trust_mask & mask).sum()
        sums[index, 2] = (reward * mask).sum()
        sums[index, 3] = rows.sum()
    if groups.data_parallel > 1:
        dist.all_reduce(sums, group=groups.dp_group)
    metrics = {}
    for index, name in enumerate(names):
        tokens, trusted, reward, rollouts = sums[index].tolist()
        share = trusted / tokens if tokens else float("nan")
        metrics[f"teacher/{name}/trust_fraction"] = share
        metrics[f"teacher/{name}/outlier_share"] = 1.0 - share if tokens else float("nan")
        metrics[f"teacher/{name}/reward"] = reward / tokens if tokens else float("nan")
        metrics[f"teacher/{name}/rollouts"] = rollouts
    return metrics


def _teacher_output_weight(stage: torch.nn.Module) -> torch.Tensor:
    """This TP rank's rows of a last stage's output layer ``[V_padded / TP, H]``: the embedding when the
    model ties them (its output layer then owns no weight on a single-stage model)."""
    if stage.share_embeddings_and_output_weights:
        return stage.shared_embedding_or_output_weight()
    return stage.output_layer.weight


def _weight_source_rank(teacher: PlacedModel) -> int:
    """The global rank of the teacher's last stage with TP and DP rank 0 (one MAX all-reduce)."""
    position = teacher.groups.position
    is_source = teacher.is_last_stage and position.tp_rank == 0 and position.dp_rank == 0
    device = next(teacher.stage.parameters()).device
    flag = torch.tensor([dist.get_rank() if is_source else -1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _full_teacher_weight(teacher: PlacedModel, vocab_size: int) -> torch.Tensor | None:
    """The teacher's output weight gathered over its TP group, true rows only ``[vocab_size, H_t]``, on
    the TP group of the source replica (None elsewhere; the gather is collective within that group)."""
    position = teacher.groups.position
    if not (teacher.is_last_stage and position.dp_rank == 0):
        return None
    local = _teacher_output_weight(teacher.stage).detach()
    tp_size = dist.get_world_size(teacher.tp_group)
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=teacher.tp_group)
    return torch.cat(parts)[:vocab_size]


def teacher_weight_for_student(teacher: PlacedModel, student: PlacedModel) -> torch.Tensor | None:
    """The teacher's output-layer rows of this student rank's vocabulary partition, fp32
    ``[V_local, H_t]`` (``ops.teacher_output_weight_shard``), on the student's last stage; None elsewhere.

    Once per job, collective on every rank in the same order: the teacher's last stage (TP and DP rank 0
    and its TP group) gathers the true rows of its output weight, broadcasts them in its parameter dtype
    to every rank, and each student last-stage rank keeps its partition and frees the rest. Peak memory
    is one ``vocab_size x H_t`` copy per rank during the broadcast.
    """
    from megatron_tropd.model_config import padded_vocab_size
    from megatron_tropd.ops import teacher_output_weight_shard, vocab_shard

    vocab_size = student.vocab_size
    source = _weight_source_rank(teacher)
    full = _full_teacher_weight(teacher, vocab_size)
    if dist.get_rank() != source:  # every rank holds a teacher stage: its parameters name dtype and device
        like = next(teacher.stage.parameters())
        full = torch.empty(vocab_size, teacher.config.hidden_size, dtype=like.dtype, device=like.device)
    dist.broadcast(full, src=source)
    if not student.is_last_stage:
        return None
    tp = student.groups.layout.tensor_parallel
    config = student.config
    local_size = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp) // tp
    shard = vocab_shard(local_size, student.tp_group, vocab_size)
    return teacher_output_weight_shard(full, shard, vocab_size, teacher.vocab_size)
