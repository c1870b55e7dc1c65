"""Exact full-vocabulary divergences of the student against a teacher given by its final hidden states.

Moving a teacher's logits between layouts costs ``tokens x vocab``; its final hidden states (after the
final norm) cost ``tokens x hidden``. So each student TP rank receives the teacher's hidden states
``h_T [T, H_t]`` for its tokens and, once per job, the rows of the teacher's output-layer weight for its
own vocabulary partition, ``W_T [V_local, H_t]`` (``teacher_output_weight_shard``). The teacher's logits
on that partition are ``h_T @ W_T^T``. They are formed one token chunk at a time and dropped after use,
in one pass over the vocabulary per step: the loss of a token depends only on its own logits row, so
when the logits need a gradient the forward writes ``dL_t / dz_t`` of each chunk, while it holds the
chunk's teacher log-probs, into one buffer shaped like the logits (the gradient the backward returns),
and the backward only scales its rows by the upstream gradient. Without a gradient (``torch.no_grad``,
metrics) no buffer is made; with ``inplace_backward=True`` none either, and the backward recomputes the
teacher's chunks (a second matmul pass) to write the gradient into the logits' own storage. Beyond that
buffer only per-token statistics ``[T]`` are kept between the passes. Further kinds (``also``) are
computed from the same chunks in the same pass, without a gradient (the ``bias/*`` metrics' forward KL
beside a reverse-KL or JSD loss): one teacher matmul pass per call whatever the number of kinds. Several
teachers (``teacher_index``) take their tokens' chunks in turn, each with its own weight rows. The
student's logits
``[T, V_local]`` are sharded as in ``vocab_parallel.py`` (rank ``r`` holds global ids
``[r * V_local, (r + 1) * V_local)``); columns at or beyond ``vocab_size`` are padding in both models and
are excluded everywhere.

Divergences (``FULL_DIVERGENCES``), per token, over the true vocabulary:

- ``forward_kl``: ``KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)``;
- ``reverse_kl``: ``KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)``;
- ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024) with ``beta`` the
  teacher's weight in the mixture, ``M = beta p_T + (1 - beta) p_S`` and
  ``JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M)`` (the convention of the top-k
  ``jsd_topk_teacher_term``); ``beta = 0.5`` is the symmetric JSD. At ``beta`` = 0 or 1 the mixture is
  one of the two distributions and the divergence is identically 0 (near 0 it behaves like
  ``beta * forward_kl``, near 1 like ``(1 - beta) * reverse_kl``), so only ``0 < beta < 1`` is accepted.

Gradients w.r.t. the student logits ``z`` (the teacher is frozen and gets none), per token:

- ``forward_kl``: ``p_S - p_T``;
- ``reverse_kl``: ``p_S * (log p_S - log p_T - KL(p_S || p_T))``;
- ``jsd``: ``(1 - beta) * p_S * (log p_S - log M - KL(p_S || M))``, from
  ``dJSD / dp_S = (1 - beta) log(p_S / M)`` pushed through the softmax Jacobian.

Collectives: forward only. Per token chunk one all-gather of the per-rank ``(max, sum-exp)`` of both
softmaxes ``[C, R, 2, 2]``. The per-rank divergence sums are all-reduced once after the last chunk
(``[T, 2]``) for ``forward_kl``; ``reverse_kl`` and ``jsd`` subtract their TP-summed divergence part in the
gradient, so they all-reduce each chunk's sums ``[C, 2]`` before writing its gradient (whether or not a
gradient is written, so the value never depends on the grad mode). The backward needs none: its
upstream gradient is replicated on the TP ranks and each rank scales the gradient of its own columns.

Precision: the whole computation, the teacher's matmul included, runs in fp32 for fp32, bf16 and fp16
inputs (fp64 when an input is fp64). The gradient buffer has the logits' dtype: ``dL_t / dz_t`` is
rounded to it before the scaling by the upstream gradient (for bf16 or fp16 logits two roundings instead
of one). A teacher weight in another dtype is converted on every pass over it, a transient
``V_local x H_t`` copy: keep the fp32 weight ``teacher_output_weight_shard`` returns by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .vocab_parallel import (
    _LOG_ZERO,
    VocabShard,
    _all_gather_cat,
    _all_reduce_sum,
    _check_ids,
    _chunk_stats,
    _chunks,
    _combine_stats,
    _flatten,
    _fused,
    vocab_shard,
)

FULL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class FullDivergence:
    """Per-token results ``[...]`` of ``vocab_parallel_full_divergence_with_stats``, replicated on the TP
    ranks; all three are 0 at masked tokens."""

    value: torch.Tensor  # the divergence, differentiable w.r.t. the student logits
    teacher_lse: torch.Tensor  # log-sum-exp of the teacher logits over the true vocabulary (no gradient)
    student_lse: torch.Tensor  # log-sum-exp of the student logits over the true vocabulary (no gradient)
    # The ``also`` divergences of the call, computed in the same pass over the vocabulary (no gradient).
    also: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_divergence(kind: str, beta: float) -> None:
    if kind not in FULL_DIVERGENCES:
        raise ValueError(
            f"unknown full-vocabulary divergence {kind!r}; allowed: {', '.join(FULL_DIVERGENCES)}"
        )
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"JSD beta must lie in (0, 1), got {beta}: at 0 and 1 the divergence is identically 0. For the "
            "limits use kind='forward_kl' (beta -> 0, up to the factor beta) or kind='reverse_kl' "
            "(beta -> 1, up to the factor 1 - beta)"
        )


def _log_probs(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[C, V]`` clamped at ``_LOG_ZERO``: exp() of it is exactly 0, so ``p * log-term`` is 0."""
    return torch.sub(z, lse.unsqueeze(-1)).clamp_min_(_LOG_ZERO)


def _log_mixture(lp_teacher: torch.Tensor, lp_student: torch.Tensor, beta: float) -> torch.Tensor:
    """``log M = log(beta p_T + (1 - beta) p_S)`` in log space ``[C, V]``."""
    return torch.logaddexp(lp_teacher + math.log(beta), lp_student + math.log1p(-beta))


# Chunk kernels. ``terms``: this rank's part of the per-token sums ``[C, 2]`` (forward and reverse KL use
# column 0; the JSD puts KL(p_T || M) in column 0 and KL(p_S || M) in column 1). ``grad``: the gradient
# ``dL_t / dz_t`` of one chunk ``[C, V_valid]`` before the upstream gradient, given ``aux`` (the TP-summed
# per-token sum the formula subtracts). ``lp_teacher`` is the chunk's teacher log-probs, ``z_student``
# the student logits.


@_fused
def _forward_kl_terms(lp_teacher, z_student, lse_student, beta):
    gap = _log_probs(z_student, lse_student).neg_().add_(lp_teacher)  # lp_T - lp_S
    part = lp_teacher.exp().mul_(gap).sum(-1)
    return torch.stack([part, torch.zeros_like(part)], -1)


def _stack_part(part: torch.Tensor) -> torch.Tensor:
    return torch.stack([part, torch.zeros_like(part)], -1)


@_fused
def _forward_kl_terms_and_grad(lp_teacher, z_student, lse_student):
    """``_forward_kl_terms``' per-token part ``[C]`` and ``_forward_kl_grad`` from one student log-prob
    buffer: the same operations on the same values, so both results are bit-identical to the two kernels'."""
    lp_student = _log_probs(z_student, lse_student)
    p_teacher = lp_teacher.exp()
    part = torch.sub(lp_teacher, lp_student).mul_(p_teacher).sum(-1)
    return part, lp_student.exp_().sub_(p_teacher)


@_fused
def _forward_kl_grad(lp_teacher, z_student, lse_student, aux, beta):
    p_student = _log_probs(z_student, lse_student).exp_()
    return p_student.sub_(lp_teacher.exp())


@_fused
def _reverse_kl_terms(lp_teacher, z_student, lse_student, beta):
    lp_student = _log_probs(z_student, lse_student)
    gap = torch.sub(lp_student, lp_teacher)
    part = lp_student.exp_().mul_(gap).sum(-1)
    return torch.stack([part, torch.zeros_like(part)], -1)


@_fused
def _reverse_kl_grad(lp_teacher, z_student, lse_student, aux, beta):
    lp_student = _log_probs(z_student, lse_student)
    coefficient = torch.sub(lp_student, lp_teacher).sub_(aux.unsqueeze(-1))
    return lp_student.exp_().mul_(coefficient)


@_fused
def _jsd_terms(lp_teacher, z_student, lse_student, beta):
    lp_student = _log_probs(z_student, lse_student)
    lp_mix = _log_mixture(lp_teacher, lp_student, beta)
    teacher_part = lp_teacher.exp().mul_(lp_teacher - lp_mix).sum(-1)
    student_part = lp_student.exp().mul_(lp_student - lp_mix).sum(-1)
    return torch.stack([teacher_part, student_part], -1)


@_fused
def _jsd_grad(lp_teacher, z_student, lse_student, aux, beta):
    lp_student = _log_probs(z_student, lse_student)
    coefficient = torch.sub(lp_student, _log_mixture(lp_teacher, lp_student, beta)).sub_(aux.unsqueeze(-1))
    return lp_student.exp_().mul_(coefficient.mul_(1.0 - beta))


_KERNELS = {
    "forward_kl": (_forward_kl_terms, _forward_kl_grad),
    "reverse_kl": (_reverse_kl_terms, _reverse_kl_grad),
    "jsd": (_jsd_terms, _jsd_grad),
}
# Kinds whose gradient reads ``aux``, a sum over the whole vocabulary: their chunk sums are all-reduced
# chunk by chunk so that the forward can write a chunk's gradient while it still holds its teacher
# log-probs. ``forward_kl``'s gradient does not read it; its sums are all-reduced once after the loop.
_TP_SUMS_PER_CHUNK = frozenset({"reverse_kl", "jsd"})


def _aux(terms: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-token sum ``[T]`` the gradient subtracts, from TP-summed ``terms [T, 2]``."""
    return terms[:, 1].contiguous() if kind == "jsd" else terms[:, 0].clone()


def _value(terms: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """The divergence ``[T]`` from the TP-summed ``terms [T, 2]``."""
    if kind == "jsd":
        return beta * terms[:, 0] + (1.0 - beta) * terms[:, 1]
    return terms[:, 0].contiguous()


def _row_chunks(num_tokens: int, selected, local_size: int, chunk_tokens, device):
    """Row selectors of the token chunks: slices over all rows, or index tensors of the unmasked rows
    ``selected`` when a token mask is given (masked tokens are never computed)."""
    if selected is None:
        yield from _chunks(num_tokens, local_size, chunk_tokens, device)
        return
    for part in _chunks(selected.numel(), local_size, chunk_tokens, device):
        yield selected[part]


def _teacher_logits(hidden_rows: torch.Tensor, weight_valid: torch.Tensor) -> torch.Tensor:
    """Teacher logits of one chunk on this rank's real columns ``[C, V_valid]`` (a fresh buffer)."""
    return torch.mm(hidden_rows.to(weight_valid.dtype), weight_valid.t())


def _teacher_log_probs(hidden_rows, weight_valid, lse_teacher):
    """The chunk's teacher logits turned in place into clamped log-probs ``[C, V_valid]``."""
    return _teacher_logits(hidden_rows, weight_valid).sub_(lse_teacher.unsqueeze(-1)).clamp_min_(_LOG_ZERO)


def _local_max_sum_exp(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(max, sum exp(z - max))`` per row ``[C, 2]`` of this rank's columns; ``(-inf, 0)`` for none."""
    if z.shape[-1] == 0:
        empty = torch.zeros(z.shape[0], 2, dtype=dtype, device=z.device)
        empty[:, 0] = float("-inf")
        return empty
    local_max, sum_exp, _ = _chunk_stats(z, dtype, False)
    return torch.stack([local_max, sum_exp], -1)


def _global_lse_pair(z_student, z_teacher, tp_group, dtype):
    """Global log-sum-exp ``[C]`` of the student and of the teacher chunk (one all-gather)."""
    local = torch.stack([_local_max_sum_exp(z_student, dtype), _local_max_sum_exp(z_teacher, dtype)], 1)
    gathered = _all_gather_cat(local.unsqueeze(1), tp_group, dim=1)  # [C, R, model, 2]
    return _combine_stats(gathered[:, :, 0], False).lse, _combine_stats(gathered[:, :, 1], False).lse


@dataclass(frozen=True)
class _Problem:
    """What one call's chunk passes read: the flat inputs and the call's configuration."""

    logits: torch.Tensor  # [T, V_local]
    hidden: torch.Tensor  # [T, H], H the widest teacher's hidden size
    weights_valid: tuple[torch.Tensor, ...]  # per teacher [V_valid, H_i <= H] in the compute dtype
    selected: torch.Tensor | None  # unmasked token rows (of any teacher), or None for all
    shard: VocabShard
    tp_group: object
    kind: str
    beta: float
    chunk_tokens: int | None
    dtype: torch.dtype  # compute dtype
    also: tuple[str, ...] = ()  # further kinds computed in the forward's pass, without a gradient
    teacher_rows: tuple[torch.Tensor | None, ...] = (None,)  # per teacher its rows (one teacher: selected)

    def row_chunks(self):
        """``(rows, teacher hidden states of the rows, the teacher's weight)`` per chunk, teacher by
        teacher: a chunk's rows share one teacher, so its logits are one matmul."""
        rows, device = self.logits.shape[0], self.logits.device
        for weight, selected in zip(self.weights_valid, self.teacher_rows, strict=True):
            for chunk in _row_chunks(rows, selected, self.shard.local_size, self.chunk_tokens, device):
                yield chunk, self.hidden[chunk, : weight.shape[1]], weight


def _problem(
    logits, hidden, weights, selected, shard, tp_group, kind, beta, chunk_tokens, dtype, also=(),
    teacher_index=None,
) -> _Problem:  # fmt: skip
    """The ``_Problem`` of a call; the weights' real rows in the compute dtype (no copy when already).
    With ``teacher_index [T]`` each teacher computes the selected rows whose index is its own."""
    weights_valid = tuple(weight[: shard.valid_size].to(dtype) for weight in weights)
    teacher_rows = (selected,)
    if teacher_index is not None:
        chosen = teacher_index if selected is None else teacher_index[selected]
        rows = torch.arange(logits.shape[0], device=logits.device) if selected is None else selected
        teacher_rows = tuple(rows[chosen == index] for index in range(len(weights)))
    return _Problem(
        logits, hidden, weights_valid, selected, shard, tp_group, kind, beta, chunk_tokens, dtype, also,
        teacher_rows,
    )  # fmt: skip


def _compute_dtype(logits, hidden, *weights) -> torch.dtype:
    dtype = torch.promote_types(logits.dtype, hidden.dtype)
    for weight in weights:
        dtype = torch.promote_types(dtype, weight.dtype)
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _ForwardStats:
    """Per-token results of the forward pass, compute dtype."""

    lse_student: torch.Tensor  # [T]
    lse_teacher: torch.Tensor  # [T]
    terms: torch.Tensor  # [T, 2], TP-summed once the pass ends
    also_terms: torch.Tensor  # [T, len(also), 2]: the ``also`` kinds' sums, TP-summed once the pass ends


def _chunk_terms(problem: _Problem, lp_teacher, z_student, lse_student) -> torch.Tensor:
    """This rank's divergence sums of one chunk ``[C, 2]``, TP-summed already for ``_TP_SUMS_PER_CHUNK``."""
    if problem.shard.valid_size:
        part = _KERNELS[problem.kind][0](lp_teacher, z_student, lse_student, problem.beta)
    else:
        part = lse_student.new_zeros(lse_student.shape[0], 2)
    if problem.kind in _TP_SUMS_PER_CHUNK:
        part = _all_reduce_sum(part, problem.tp_group)  # every rank joins, real columns or not
    return part


def _also_terms(problem: _Problem, lp_teacher, z_student, lse_student) -> torch.Tensor:
    """This rank's sums ``[C, len(also), 2]`` of the ``also`` kinds on one chunk (not yet TP-summed)."""
    if not problem.shard.valid_size:
        return lse_student.new_zeros(lse_student.shape[0], len(problem.also), 2)
    parts = [_KERNELS[kind][0](lp_teacher, z_student, lse_student, problem.beta) for kind in problem.also]
    return torch.stack(parts, 1)


def _forward_pass(problem: _Problem, grad_logits: torch.Tensor | None) -> _ForwardStats:
    """The forward's one pass over the teacher's vocabulary, chunk by chunk: both log-sum-exps and the
    TP-summed divergence sums (those of the ``also`` kinds too); with ``grad_logits`` also each chunk's
    ``dL_t / dz_t`` written into it."""
    logits, valid, dtype = problem.logits, problem.shard.valid_size, problem.dtype
    lse = torch.zeros(logits.shape[0], dtype=dtype, device=logits.device)
    also = lse.new_zeros(logits.shape[0], len(problem.also), 2)
    stats = _ForwardStats(lse, torch.zeros_like(lse), lse.new_zeros(logits.shape[0], 2), also)
    for rows, hidden_rows, weight in problem.row_chunks():
        z_student = logits[rows, :valid].to(dtype)
        z_teacher = _teacher_logits(hidden_rows, weight)
        lse_s, lse_t = _global_lse_pair(z_student, z_teacher, problem.tp_group, dtype)
        lp_teacher = z_teacher.sub_(lse_t.unsqueeze(-1)).clamp_min_(_LOG_ZERO)  # in place: one buffer
        if problem.also:
            stats.also_terms[rows] = _also_terms(problem, lp_teacher, z_student, lse_s)
        stats.terms[rows] = _chunk_terms_and_gradient(
            problem, lp_teacher, z_student, lse_s, grad_logits, rows
        )
        stats.lse_student[rows], stats.lse_teacher[rows] = lse_s, lse_t
        del z_student, z_teacher, lp_teacher  # freed before the next chunk's matmul allocates
    if problem.kind not in _TP_SUMS_PER_CHUNK:
        stats.terms = _all_reduce_sum(stats.terms, problem.tp_group)
    if problem.also:
        stats.also_terms = _all_reduce_sum(stats.also_terms, problem.tp_group)
    return stats


def _chunk_terms_and_gradient(problem: _Problem, lp_teacher, z_student, lse_s, grad_logits, rows):
    """One chunk's divergence sums ``[C, 2]`` (``_chunk_terms``) and, with ``grad_logits``, its
    ``dL_t / dz_t`` written there. The forward KL's gradient needs no TP sum, so one kernel makes both
    from the same student log-probs (bit-identical to the two kernels, with a third fewer passes)."""
    valid = problem.shard.valid_size
    if grad_logits is not None and valid and problem.kind == "forward_kl":
        part, grad_logits[rows, :valid] = _forward_kl_terms_and_grad(lp_teacher, z_student, lse_s)
        return _stack_part(part)
    part = _chunk_terms(problem, lp_teacher, z_student, lse_s)
    if grad_logits is not None and valid:
        grad_kernel = _KERNELS[problem.kind][1]
        grad_logits[rows, :valid] = grad_kernel(
            lp_teacher, z_student, lse_s, _aux(part, problem.kind), problem.beta
        )
    return part


def _recomputed_gradient(problem: _Problem, lse_student, lse_teacher, aux, inplace: bool) -> torch.Tensor:
    """The backward's second pass over the teacher's vocabulary when the forward wrote no gradient: each
    selected row's ``dL_t / dz_t``, with ``inplace`` over the logits' own rows (each chunk reads its rows
    before writing them)."""
    logits, valid, dtype = problem.logits, problem.shard.valid_size, problem.dtype
    grad_logits = logits if inplace else torch.empty_like(logits)
    grad_kernel = _KERNELS[problem.kind][1]
    for rows, hidden_rows, weight in problem.row_chunks() if valid else ():
        z_student = logits[rows, :valid].to(dtype)
        lp_teacher = _teacher_log_probs(hidden_rows, weight, lse_teacher[rows])
        grad = grad_kernel(lp_teacher, z_student, lse_student[rows], aux[rows], problem.beta)
        grad_logits[rows, :valid] = grad
        del z_student, lp_teacher, grad  # freed before the next chunk's matmul allocates
    return grad_logits


def _scale_by_upstream(grad_logits: torch.Tensor, grad_value: torch.Tensor, selected, valid: int) -> None:
    """``dL_t / dz_t`` rows times the upstream gradient ``[T]``, in place; padded columns and unselected
    rows (never written: they may hold anything) set to 0 afterwards."""
    grad_logits.mul_(grad_value.unsqueeze(-1))
    grad_logits[:, valid:] = 0
    if selected is not None:
        unselected = torch.ones(grad_logits.shape[0], dtype=torch.bool, device=grad_logits.device)
        unselected[selected] = False
        grad_logits[unselected] = 0


class _FullVocabDivergence(torch.autograd.Function):
    """A full-vocabulary divergence per token between vocab-sharded student logits and a teacher given by
    hidden states and the weight rows of the same vocabulary partition.

    Shapes: ``logits [T, V_local]`` (sharded on the last dim over ``tp_group``, differentiable),
    ``hidden [T, H_t]`` (replicated), ``weight [V_local, H_t]`` (this rank's partition), ``selected [n]``
    the unmasked token rows or None. Outputs ``value``, ``teacher_lse``, ``student_lse`` ``[T]``, replicated;
    only ``value`` is differentiable.
    Forward: one pass of chunks (``_forward_pass``). With ``write_gradient`` it fills a buffer shaped like
    the logits with ``dL_t / dz_t`` and saves only that buffer (the gradient the backward returns) and
    ``selected``; the backward scales it in place by the upstream gradient and returns it, with no
    teacher matmul and no collective. Otherwise (``inplace_backward`` or no gradient) it saves the inputs
    (no copies) and three ``[T]`` statistics, and the backward recomputes the teacher's chunks into the
    logits' storage (or, were it ever reached without ``inplace_backward``, into a fresh buffer). Never
    a teacher-logits chunk is saved; padded columns and masked rows get 0.
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        hidden,
        weights,
        selected,
        tp_group,
        vocab_size,
        kind,
        beta,
        chunk_tokens,
        inplace_backward,
        write_gradient,
        also,
        teacher_index,
    ):
        shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
        dtype = _compute_dtype(logits, hidden, *weights)
        config = (selected, shard, tp_group, kind, beta, chunk_tokens, dtype)
        problem = _problem(logits, hidden, weights, *config, also, teacher_index)
        grad_logits = torch.empty_like(logits) if write_gradient else None
        stats = _forward_pass(problem, grad_logits)
        if write_gradient:
            ctx.save_for_backward(grad_logits, selected)
        else:
            aux = _aux(stats.terms, kind)
            saved = (logits, hidden, selected, stats.lse_student, stats.lse_teacher, aux, teacher_index)
            ctx.save_for_backward(*saved, *weights)
        ctx.config = (shard, tp_group, kind, beta, chunk_tokens, dtype, inplace_backward, write_gradient)
        also_values = torch.stack(
            [_value(stats.also_terms[:, i], other, beta) for i, other in enumerate(also)], -1
        ) if also else stats.lse_teacher.new_zeros(logits.shape[0], 0)  # fmt: skip
        ctx.mark_non_differentiable(stats.lse_teacher, stats.lse_student, also_values)
        return _value(stats.terms, kind, beta), stats.lse_teacher, stats.lse_student, also_values

    @staticmethod
    def backward(ctx, grad_value, grad_teacher_lse, grad_student_lse, grad_also):
        # Both log-sum-exps and the ``also`` values are non-differentiable outputs: their incoming
        # gradients are zeros or None.
        shard, tp_group, kind, beta, chunk_tokens, dtype, inplace_backward, write_gradient = ctx.config
        if write_gradient:
            grad_logits, selected = ctx.saved_tensors
        else:
            logits, hidden, selected, lse_student, lse_teacher, aux, teacher_index, *weights = (
                ctx.saved_tensors
            )
            config = (selected, shard, tp_group, kind, beta, chunk_tokens, dtype)
            problem = _problem(logits, hidden, tuple(weights), *config, (), teacher_index)
            grad_logits = _recomputed_gradient(problem, lse_student, lse_teacher, aux, inplace_backward)
        _scale_by_upstream(grad_logits, grad_value, selected, shard.valid_size)
        return grad_logits, *(None,) * 12


def _check_full_inputs(logits, teacher_hidden, weights, token_mask, chunk_tokens, teacher_index) -> None:
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must be [..., H_t] over the token dims of the "
            f"student logits {tuple(logits.shape)}"
        )
    width = teacher_hidden.shape[-1]
    for weight in weights:
        exact = len(weights) == 1 and weight.dim() == 2 and weight.shape == (logits.shape[-1], width)
        fits = len(weights) > 1 and weight.dim() == 2 and weight.shape[0] == logits.shape[-1]
        if not (exact or (fits and weight.shape[1] <= width)):
            raise ValueError(
                f"teacher_weight {tuple(weight.shape)} must be this rank's vocabulary partition "
                f"[V_local, H_t] = [{logits.shape[-1]}, {width if len(weights) == 1 else f'<= {width}'}]; "
                "slice the teacher's output weight with teacher_output_weight_shard"
            )
    if len(weights) > 1 and (teacher_index is None or teacher_index.shape != logits.shape[:-1]):
        raise ValueError(
            f"{len(weights)} teacher weights need teacher_index, each token's teacher (an integer tensor "
            f"over the token dims {tuple(logits.shape[:-1])})"
        )
    if teacher_index is not None and (teacher_index.is_floating_point() or teacher_index.dtype == torch.bool):
        raise ValueError(f"teacher_index must be an integer tensor; got {teacher_index.dtype}")
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.shape != logits.shape[:-1]):
        raise ValueError(
            f"token_mask must be a bool tensor over the token dims {tuple(logits.shape[:-1])}; got "
            f"{token_mask.dtype} {tuple(token_mask.shape)}"
        )
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive number of tokens (or None); got {chunk_tokens}")


def vocab_parallel_full_divergence_with_stats(
    logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | tuple[torch.Tensor, ...],
    tp_group,
    vocab_size: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    token_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
    also: tuple[str, ...] = (),
    teacher_index: torch.Tensor | None = None,
) -> FullDivergence:
    """Exact full-vocabulary divergence per token and both models' log-sum-exps.

    ``logits [..., V_local]``: the student's vocab-sharded logits; ``teacher_hidden [..., H_t]``: the
    teacher's final hidden states for the same tokens (replicated on the TP ranks);
    ``teacher_weight [V_local, H_t]``: the teacher's output-weight rows of this rank's partition
    (``teacher_output_weight_shard``). ``kind`` and ``beta``: see the module docstring. ``token_mask``
    ``[...]`` (bool, identical on every TP rank): tokens to compute; the others get value 0 and gradient
    0 and cost nothing. ``chunk_tokens``: rows per chunk (default: one fp32 chunk of ``CHUNK_BYTES``).
    With a gradient, the forward keeps one buffer shaped like ``logits`` (its gradient) and the backward
    runs no teacher matmul; ``inplace_backward=True`` instead overwrites ``logits`` with its gradient
    during backward (as in ``vocab_parallel_token_stats``), which costs a second pass of the teacher's
    matmul there. The teacher's hidden states and weight get no gradient. ``also``: further kinds
    (``FullDivergence.also``, same ``beta``) computed in the same pass over the teacher's vocabulary
    without a gradient, e.g. the forward KL that the ``bias/*`` metrics read beside a reverse-KL loss:
    one teacher matmul pass instead of one per kind.

    Several teachers (distinct output layers, the same vocabulary): ``teacher_weight`` is a sequence of
    their partitions ``[V_local, H_i]`` and ``teacher_index [...]`` names each token's teacher (an index
    into the sequence; any other value: no teacher, as if masked). ``teacher_hidden [..., H]`` holds each
    token's teacher hidden states in its first ``H_i`` columns (``H`` the widest). Each chunk's tokens
    share one teacher, so the pass still forms every teacher logit once, and one gradient buffer serves
    them all.
    """
    _check_divergence(kind, beta)
    kind_also_requested = kind in also
    also = tuple(dict.fromkeys(other for other in also if other != kind))
    for other in also:
        _check_divergence(other, beta)
    weights = (teacher_weight,) if isinstance(teacher_weight, torch.Tensor) else tuple(teacher_weight)
    _check_full_inputs(logits, teacher_hidden, weights, token_mask, chunk_tokens, teacher_index)
    flat = _flatten(logits)
    hidden = teacher_hidden.reshape(flat.shape[0], teacher_hidden.shape[-1]).detach()
    if teacher_index is not None:
        teacher_index = teacher_index.reshape(-1).to(torch.int64)
        has_teacher = (teacher_index >= 0) & (teacher_index < len(weights))
        token_mask = has_teacher.reshape(logits.shape[:-1]) & (True if token_mask is None else token_mask)
    selected = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(-1)
    # Decided here: inside the Function's forward grad mode is always off, and ``needs_input_grad`` is
    # set under ``torch.no_grad()`` too, where no backward will ever run.
    write_gradient = torch.is_grad_enabled() and logits.requires_grad and not inplace_backward
    value, teacher_lse, student_lse, also_values = _FullVocabDivergence.apply(
        flat, hidden, tuple(weight.detach() for weight in weights), selected, tp_group, vocab_size, kind,
        beta, chunk_tokens, inplace_backward, write_gradient, also, teacher_index,
    )  # fmt: skip
    lead = logits.shape[:-1]
    others = {other: also_values[:, i].reshape(lead) for i, other in enumerate(also)}
    if kind_also_requested:  # computed once, as the main value
        others[kind] = value.detach().reshape(lead)
    return FullDivergence(value.reshape(lead), teacher_lse.reshape(lead), student_lse.reshape(lead), others)


def vocab_parallel_full_divergence(
    logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | tuple[torch.Tensor, ...],
    tp_group,
    vocab_size: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    token_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
    teacher_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact full-vocabulary divergence per token ``[...]`` (fp32; fp64 for fp64 inputs), differentiable
    w.r.t. the student ``logits``; arguments as ``vocab_parallel_full_divergence_with_stats``."""
    return vocab_parallel_full_divergence_with_stats(
        logits, teacher_hidden, teacher_weight, tp_group, vocab_size, kind, beta, token_mask, chunk_tokens,
        inplace_backward, teacher_index=teacher_index,
    ).value  # fmt: skip


@torch.no_grad()
def vocab_parallel_teacher_log_probs_at(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    ids: torch.Tensor,
    teacher_lse: torch.Tensor,
    tp_group,
    vocab_size: int,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Teacher log-probs at global ``ids [..., m]`` from its hidden states: ``h_T . W_T[id] - lse_T``.

    Each id's logit is one dot product on the rank owning its row, summed over TP by one all-reduce of
    ``[T, m]``: ``O(T * m * H_t)``, no pass over the vocabulary. ``teacher_lse [...]`` is
    ``FullDivergence.teacher_lse`` of the same tokens.
    """
    _check_ids(ids, vocab_size)
    if ids.shape[:-1] != teacher_hidden.shape[:-1] or teacher_lse.shape != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} and teacher_lse "
            f"{tuple(teacher_lse.shape)} must share the token dims"
        )
    shard = vocab_shard(teacher_weight.shape[0], tp_group, vocab_size)
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    local_ids = ids.reshape(hidden.shape[0], -1).to(torch.int64) - shard.start
    owned = (local_ids >= 0) & (local_ids < shard.valid_size)
    index = local_ids.clamp(0, shard.local_size - 1)
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, teacher_weight.dtype), torch.float32)
    picked = torch.zeros(index.shape, dtype=dtype, device=hidden.device)  # [T, m]
    for rows in _chunks(hidden.shape[0], index.shape[1] * hidden.shape[1], chunk_tokens, hidden.device):
        rows_weight = teacher_weight[index[rows]].to(dtype)  # [C, m, H_t]
        picked[rows] = torch.einsum("ch,cmh->cm", hidden[rows].to(dtype), rows_weight)
    picked = _all_reduce_sum(torch.where(owned, picked, torch.zeros_like(picked)), tp_group)
    return (picked - teacher_lse.reshape(-1, 1).to(dtype)).reshape(ids.shape)


def teacher_output_weight_shard(
    teacher_weight: torch.Tensor,
    student_shard: VocabShard,
    vocab_size: int,
    teacher_vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The rows of a teacher's full output weight ``[V_padded_teacher, H_t]`` for one student rank's
    vocabulary partition ``student_shard``: ``[V_local, H_t]`` in ``dtype``.

    Only the true vocabulary is read: the teacher's own padding rows (its padded vocabulary may be larger
    or smaller than the student's) never are, and the rows of the student's padded columns are zeros
    (the divergence masks them anyway). A tied-embedding teacher passes its embedding matrix. Made once
    per job; the fp32 default is the divergence's compute dtype, so it never converts the weight per call.
    """
    if teacher_vocab_size != vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_vocab_size} tokens and the student's {vocab_size}: they "
            "use different tokenizers, and full-vocabulary divergences need the same one"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape[0] < teacher_vocab_size:
        raise ValueError(
            f"teacher_weight {tuple(teacher_weight.shape)} must be the full output weight "
            f"[V_padded >= {teacher_vocab_size}, H_t]"
        )
    expected_valid = max(0, min(student_shard.local_size, vocab_size - student_shard.start))
    if student_shard.valid_size != expected_valid:
        raise ValueError(
            f"{student_shard} does not describe a partition of a {vocab_size}-token vocabulary; build it "
            "with vocab_shard(local_size, tp_group, vocab_size)"
        )
    start, valid = student_shard.start, student_shard.valid_size
    shard_weight = teacher_weight.new_zeros(student_shard.local_size, teacher_weight.shape[1], dtype=dtype)
    shard_weight[:valid] = teacher_weight[start : start + valid]
    return shard_weight
