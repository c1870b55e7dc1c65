"""Exact full-vocabulary divergences of the student against a teacher given by its final hidden states.

Moving a teacher's logits between layouts costs ``tokens x vocab``; its final hidden states (after the
final norm) cost ``tokens x hidden``. So each student TP rank receives the teacher's hidden states
``h_T [T, H_t]`` for its tokens and, once per job, the rows of the teacher's output-layer weight for its
own vocabulary partition, ``W_T [V_local, H_t]`` (``teacher_output_weight_shard``). The teacher's logits
on that partition are ``h_T @ W_T^T``. They are formed one token chunk at a time and dropped after use:
the forward pass computes each chunk once, the backward pass computes it again, and only per-token
statistics ``[T]`` are kept in between. The student's logits ``[T, V_local]`` are sharded as in
``vocab_parallel.py`` (rank ``r`` holds global ids ``[r * V_local, (r + 1) * V_local)``); columns at or
beyond ``vocab_size`` are padding in both models and are excluded everywhere.

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
softmaxes ``[C, R, 2, 2]``; after the last chunk one all-reduce of the per-rank divergence sums ``[T, 2]``.
The backward needs none: its upstream gradient is replicated on the TP ranks and each rank writes the
gradient of its own columns from the saved per-token log-sum-exps and divergence parts.

Precision: the whole computation, the teacher's matmul included, runs in fp32 for fp32, bf16 and fp16
inputs (fp64 when an input is fp64). A teacher weight in another dtype is converted on every forward and
backward pass, a transient ``V_local x H_t`` copy: keep the fp32 weight ``teacher_output_weight_shard``
returns by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
# of one chunk ``[C, V_valid]`` given the upstream gradient and ``aux`` (the per-token sum the formula
# subtracts). ``lp_teacher`` is the chunk's teacher log-probs, ``z_student`` the student logits.


@_fused
def _forward_kl_terms(lp_teacher, z_student, lse_student, beta):
    gap = _log_probs(z_student, lse_student).neg_().add_(lp_teacher)  # lp_T - lp_S
    part = lp_teacher.exp().mul_(gap).sum(-1)
    return torch.stack([part, torch.zeros_like(part)], -1)


@_fused
def _forward_kl_grad(lp_teacher, z_student, lse_student, aux, grad_value, beta):
    p_student = _log_probs(z_student, lse_student).exp_()
    return p_student.sub_(lp_teacher.exp()).mul_(grad_value.unsqueeze(-1))


@_fused
def _reverse_kl_terms(lp_teacher, z_student, lse_student, beta):
    lp_student = _log_probs(z_student, lse_student)
    gap = torch.sub(lp_student, lp_teacher)
    part = lp_student.exp_().mul_(gap).sum(-1)
    return torch.stack([part, torch.zeros_like(part)], -1)


@_fused
def _reverse_kl_grad(lp_teacher, z_student, lse_student, aux, grad_value, beta):
    lp_student = _log_probs(z_student, lse_student)
    coefficient = torch.sub(lp_student, lp_teacher).sub_(aux.unsqueeze(-1)).mul_(grad_value.unsqueeze(-1))
    return lp_student.exp_().mul_(coefficient)


@_fused
def _jsd_terms(lp_teacher, z_student, lse_student, beta):
    lp_student = _log_probs(z_student, lse_student)
    lp_mix = _log_mixture(lp_teacher, lp_student, beta)
    teacher_part = lp_teacher.exp().mul_(lp_teacher - lp_mix).sum(-1)
    student_part = lp_student.exp().mul_(lp_student - lp_mix).sum(-1)
    return torch.stack([teacher_part, student_part], -1)


@_fused
def _jsd_grad(lp_teacher, z_student, lse_student, aux, grad_value, beta):
    lp_student = _log_probs(z_student, lse_student)
    coefficient = torch.sub(lp_student, _log_mixture(lp_teacher, lp_student, beta)).sub_(aux.unsqueeze(-1))
    coefficient.mul_((grad_value * (1.0 - beta)).unsqueeze(-1))
    return lp_student.exp_().mul_(coefficient)


_KERNELS = {
    "forward_kl": (_forward_kl_terms, _forward_kl_grad),
    "reverse_kl": (_reverse_kl_terms, _reverse_kl_grad),
    "jsd": (_jsd_terms, _jsd_grad),
}


def _value_and_aux(terms: torch.Tensor, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence ``[T]`` from the TP-summed ``terms [T, 2]``, and the sum its gradient subtracts."""
    if kind == "jsd":
        return beta * terms[:, 0] + (1.0 - beta) * terms[:, 1], terms[:, 1].contiguous()
    value = terms[:, 0].contiguous()
    return value, value.clone()


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


def _zero_unselected_rows(grad_logits: torch.Tensor, selected) -> None:
    if selected is not None:
        unselected = torch.ones(grad_logits.shape[0], dtype=torch.bool, device=grad_logits.device)
        unselected[selected] = False
        grad_logits[unselected] = 0


class _FullVocabDivergence(torch.autograd.Function):
    """A full-vocabulary divergence per token between vocab-sharded student logits and a teacher given by
    hidden states and the weight rows of the same vocabulary partition.

    Shapes: ``logits [T, V_local]`` (sharded on the last dim over ``tp_group``, differentiable),
    ``hidden [T, H_t]`` (replicated), ``weight [V_local, H_t]`` (this rank's partition), ``selected [n]``
    the unmasked token rows or None. Outputs ``value``, ``teacher_lse``, ``student_lse`` ``[T]``, replicated.
    Forward: per chunk, the teacher logits from one matmul, both softmaxes' statistics (one all-gather),
    the chunk's divergence parts; then one all-reduce of the parts ``[T, 2]``. Saved: the inputs (no
    copies) and three ``[T]`` statistics, never a teacher-logits chunk. Backward: no collective; per chunk
    the teacher logits are recomputed and the gradient of the local columns written (into the logits'
    storage with ``inplace_backward``); padded columns and masked rows get 0.
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        hidden,
        weight,
        selected,
        tp_group,
        vocab_size,
        kind,
        beta,
        chunk_tokens,
        inplace_backward,
    ):
        shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
        dtype = torch.promote_types(torch.promote_types(logits.dtype, hidden.dtype), weight.dtype)
        dtype = torch.promote_types(dtype, torch.float32)
        num_tokens, valid = logits.shape[0], shard.valid_size
        weight_valid = weight[:valid].to(dtype)  # no copy for a weight already in the compute dtype
        lse_student = torch.zeros(num_tokens, dtype=dtype, device=logits.device)
        lse_teacher = torch.zeros_like(lse_student)
        terms = torch.zeros(num_tokens, 2, dtype=dtype, device=logits.device)
        terms_kernel = _KERNELS[kind][0]
        for rows in _row_chunks(num_tokens, selected, shard.local_size, chunk_tokens, logits.device):
            z_student = logits[rows, :valid].to(dtype)
            z_teacher = _teacher_logits(hidden[rows], weight_valid)
            lse_s, lse_t = _global_lse_pair(z_student, z_teacher, tp_group, dtype)
            lp_teacher = z_teacher.sub_(lse_t.unsqueeze(-1)).clamp_min_(_LOG_ZERO)  # in place: one buffer
            if valid:
                terms[rows] = terms_kernel(lp_teacher, z_student, lse_s, beta)
            lse_student[rows], lse_teacher[rows] = lse_s, lse_t
            del z_student, z_teacher, lp_teacher  # freed before the next chunk's matmul allocates
        value, aux = _value_and_aux(_all_reduce_sum(terms, tp_group), kind, beta)
        ctx.save_for_backward(logits, hidden, weight, selected, lse_student, lse_teacher, aux)
        ctx.config = (shard, kind, beta, chunk_tokens, inplace_backward, dtype)
        ctx.mark_non_differentiable(lse_teacher, lse_student)
        return value, lse_teacher, lse_student

    @staticmethod
    def backward(ctx, grad_value, grad_teacher_lse, grad_student_lse):
        logits, hidden, weight, selected, lse_student, lse_teacher, aux = ctx.saved_tensors
        shard, kind, beta, chunk_tokens, inplace_backward, dtype = ctx.config
        valid = shard.valid_size
        grad_logits = logits if inplace_backward else torch.empty_like(logits)
        grad_logits[:, valid:] = 0  # padded columns take no gradient
        _zero_unselected_rows(grad_logits, selected)
        nones = (None,) * 9
        if valid == 0:
            return grad_logits, *nones
        weight_valid = weight[:valid].to(dtype)
        grad_value = grad_value.to(dtype)
        grad_kernel = _KERNELS[kind][1]
        for rows in _row_chunks(logits.shape[0], selected, shard.local_size, chunk_tokens, logits.device):
            z_student = logits[rows, :valid].to(dtype)
            lp_teacher = _teacher_log_probs(hidden[rows], weight_valid, lse_teacher[rows])
            grad = grad_kernel(lp_teacher, z_student, lse_student[rows], aux[rows], grad_value[rows], beta)
            grad_logits[rows, :valid] = grad
            del z_student, lp_teacher, grad  # freed before the next chunk's matmul allocates
        return grad_logits, *nones


def _check_full_inputs(logits, teacher_hidden, teacher_weight, token_mask, chunk_tokens) -> None:
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must be [..., H_t] over the token dims of the "
            f"student logits {tuple(logits.shape)}"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape != (logits.shape[-1], teacher_hidden.shape[-1]):
        raise ValueError(
            f"teacher_weight {tuple(teacher_weight.shape)} must be this rank's vocabulary partition "
            f"[V_local, H_t] = [{logits.shape[-1]}, {teacher_hidden.shape[-1]}]; slice the teacher's output "
            "weight with teacher_output_weight_shard"
        )
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
    teacher_weight: torch.Tensor,
    tp_group,
    vocab_size: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    token_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
) -> FullDivergence:
    """Exact full-vocabulary divergence per token and both models' log-sum-exps.

    ``logits [..., V_local]``: the student's vocab-sharded logits; ``teacher_hidden [..., H_t]``: the
    teacher's final hidden states for the same tokens (replicated on the TP ranks);
    ``teacher_weight [V_local, H_t]``: the teacher's output-weight rows of this rank's partition
    (``teacher_output_weight_shard``). ``kind`` and ``beta``: see the module docstring. ``token_mask``
    ``[...]`` (bool, identical on every TP rank): tokens to compute; the others get value 0 and gradient
    0 and cost nothing. ``chunk_tokens``: rows per chunk (default: one fp32 chunk of ``CHUNK_BYTES``).
    ``inplace_backward=True`` overwrites ``logits`` with its gradient during backward (as in
    ``vocab_parallel_token_stats``). The teacher's hidden states and weight get no gradient.
    """
    _check_divergence(kind, beta)
    _check_full_inputs(logits, teacher_hidden, teacher_weight, token_mask, chunk_tokens)
    flat = _flatten(logits)
    hidden = teacher_hidden.reshape(flat.shape[0], teacher_hidden.shape[-1]).detach()
    selected = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(-1)
    value, teacher_lse, student_lse = _FullVocabDivergence.apply(
        flat, hidden, teacher_weight.detach(), selected, tp_group, vocab_size, kind, beta, chunk_tokens,
        inplace_backward,
    )  # fmt: skip
    lead = logits.shape[:-1]
    return FullDivergence(value.reshape(lead), teacher_lse.reshape(lead), student_lse.reshape(lead))


def vocab_parallel_full_divergence(
    logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    tp_group,
    vocab_size: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    token_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Exact full-vocabulary divergence per token ``[...]`` (fp32; fp64 for fp64 inputs), differentiable
    w.r.t. the student ``logits``; arguments as ``vocab_parallel_full_divergence_with_stats``."""
    return vocab_parallel_full_divergence_with_stats(
        logits, teacher_hidden, teacher_weight, tp_group, vocab_size, kind, beta, token_mask, chunk_tokens,
        inplace_backward,
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
