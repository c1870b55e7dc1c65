"""The vocab-parallel cross-entropy extension: distillation signals over TP-sharded logits.

Every function takes a logits shard ``[..., V_local]`` whose last dim is this rank's slice of the padded
vocabulary: rank ``r`` of ``tp_group`` holds global ids ``[r * V_local, (r + 1) * V_local)``, as
Megatron-Core's ``ColumnParallelLinear`` output layer produces. ``vocab_size`` is the true vocabulary;
columns at or beyond it are padding and are excluded everywhere. ``tp_group=None`` means the logits are
not sharded (TP = 1) and no collective runs; otherwise the group is always passed in explicitly.

Memory: the vocabulary is only ever touched one token chunk at a time (``chunk_tokens`` rows, by default
sized so one fp32 chunk is the device's ``CHUNK_BYTES``), so no full-vocab fp32 copy of the batch is
ever made. The backward recomputes the softmax chunk by chunk from the saved logits and the per-token
log-sum-exp, and with ``inplace_backward=True`` writes the gradient into the logits' own storage (as
Megatron's cross-entropy does), so the whole op needs only chunk-sized scratch memory beyond its input.

Collectives: forward only. Per call, one all-gather of per-rank ``(max, sum-exp[, entropy part])``
statistics ``[T, 2|3]``, one all-reduce of the gathered logits ``[T, m]``, and for top-k one all-gather of
``[T, k]`` candidates. The backward needs none: its upstream gradient is replicated on the TP ranks
(every rank computes the same loss from the same replicated outputs), and each rank writes the gradient
of its own columns only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .divergence import agreement_ratio, jsd_topk_teacher_term, topk_forward_kl

# Scratch budget of one fp32 vocabulary chunk per device type. On CPU 32 MiB keeps the peak extra memory
# of a 151,936-entry vocabulary at a few percent of one full-batch fp32 logits copy. On CUDA each chunk is a
# compiled kernel call with a fixed overhead, so chunks are larger (128 MiB: still ~6% of that copy for
# 4,096 tokens, and ~0.6x the time of the unchunked computation on an H100).
CHUNK_BYTES = {"cpu": 32 * 1024 * 1024, "cuda": 128 * 1024 * 1024}
# Log-probabilities are clamped here: exp() of it is exactly 0 in every float type, and unlike -inf it
# keeps products such as ``p * log p`` at 0 instead of NaN.
_LOG_ZERO = -1.0e4


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's columns sit in the global (padded) vocabulary."""

    start: int  # global id of local column 0
    local_size: int  # columns held by this rank, padding included
    valid_size: int  # leading local columns that are real tokens (global id < vocab_size)


def _tp_rank_and_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def vocab_shard(local_size: int, tp_group, vocab_size: int) -> VocabShard:
    """The global id range of this rank's columns; checks ``vocab_size`` fits the padded vocabulary."""
    rank, world = _tp_rank_and_size(tp_group)
    padded = local_size * world
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size {vocab_size} does not fit logits sharded as {world} x {local_size} = {padded} "
            "columns; pass the true (unpadded) vocabulary of the model that produced the logits"
        )
    start = rank * local_size
    return VocabShard(start, local_size, max(0, min(local_size, vocab_size - start)))


def _chunks(num_tokens: int, local_size: int, chunk_tokens: int | None, device: torch.device):
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    step = chunk_tokens or max(1, budget // (4 * max(local_size, 1)))
    for begin in range(0, num_tokens, step):
        yield slice(begin, min(begin + step, num_tokens))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _all_gather_cat(tensor: torch.Tensor, tp_group, dim: int) -> torch.Tensor:
    """Concatenate every TP rank's ``tensor`` along ``dim`` in rank order."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def _all_reduce_sum(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=tp_group)
    return tensor


@dataclass
class LogSoftmaxStats:
    """Per-token statistics of the full-vocabulary softmax ``[T]`` each (compute dtype)."""

    max: torch.Tensor  # global max logit over the true vocabulary
    lse: torch.Tensor  # global log-sum-exp
    entropy: torch.Tensor | None  # full-vocabulary entropy, when asked for


def _fused(kernel):
    """On CUDA, ``torch.compile`` fuses a chunk kernel's element-wise passes into one or two kernels (the
    chunk loop is launch- and bandwidth-bound otherwise); on CPU the same function runs eagerly.
    ``TROPD_COMPILE_OPS=0`` turns compilation off."""
    compiled = None

    def run(tensor: torch.Tensor, *args):
        nonlocal compiled
        if not tensor.is_cuda or os.environ.get("TROPD_COMPILE_OPS", "1") == "0":
            return kernel(tensor, *args)
        if compiled is None:
            compiled = torch.compile(kernel, dynamic=True)
        return compiled(tensor, *args)

    return run


@_fused
def _chunk_stats(z: torch.Tensor, dtype: torch.dtype, with_entropy: bool):
    """``(m_r, s_r, e_r)`` of one chunk ``[C, V_valid]`` with two chunk-sized buffers (in-place on
    intermediates: eager CPU runs allocate less, and compilation fuses them anyway). -inf logits are
    clamped to a finite value whose exp is exactly 0, so ``0 * log-term`` stays 0 instead of NaN."""
    local_max = z.max(-1, keepdim=True).values.to(dtype)
    shifted = torch.sub(z, torch.where(torch.isfinite(local_max), local_max, 0.0)).clamp_min_(_LOG_ZERO)
    weights = shifted.exp()
    sum_exp = weights.sum(-1)
    entropy_part = weights.mul_(shifted).sum(-1) if with_entropy else torch.zeros_like(sum_exp)
    return local_max.squeeze(-1), sum_exp, entropy_part


def _local_stats(logits: torch.Tensor, shard: VocabShard, with_entropy: bool, chunk_tokens: int | None):
    """Per rank and token: ``(m_r, s_r[, e_r])`` with ``s_r = sum exp(z - m_r)`` and
    ``e_r = sum exp(z - m_r) * (z - m_r)``, one chunk of tokens at a time. ``[T, 2|3]``."""
    dtype = _compute_dtype(logits.dtype)
    stats = torch.zeros(logits.shape[0], 3 if with_entropy else 2, dtype=dtype, device=logits.device)
    stats[:, 0] = float("-inf")
    if shard.valid_size == 0:
        return stats
    for rows in _chunks(logits.shape[0], shard.local_size, chunk_tokens, logits.device):
        local_max, sum_exp, entropy_part = _chunk_stats(logits[rows, : shard.valid_size], dtype, with_entropy)
        stats[rows, 0], stats[rows, 1] = local_max, sum_exp
        if with_entropy:
            stats[rows, 2] = entropy_part
    return stats


def _combine_stats(per_rank: torch.Tensor, with_entropy: bool) -> LogSoftmaxStats:
    """Merge ``[T, R, 2|3]`` per-rank statistics into global max, log-sum-exp and entropy."""
    rank_max = per_rank[..., 0]
    global_max = rank_max.max(-1).values
    safe_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    offset = rank_max - safe_max.unsqueeze(-1)  # <= 0, -inf for ranks holding nothing
    scale = torch.where(torch.isfinite(offset), offset.exp(), torch.zeros_like(offset))
    total = (per_rank[..., 1] * scale).sum(-1)
    lse = safe_max + total.log()
    entropy = None
    if with_entropy:
        # E_p[z - global_max] assembled from each rank's moments about its own max.
        shift_terms = torch.where(scale > 0, offset * per_rank[..., 1], torch.zeros_like(offset))
        mean_shifted = ((per_rank[..., 2] + shift_terms) * scale).sum(-1) / total
        entropy = total.log() - mean_shifted
    return LogSoftmaxStats(global_max, lse, entropy)


def _softmax_stats(logits, shard, tp_group, with_entropy, chunk_tokens) -> LogSoftmaxStats:
    local = _local_stats(logits, shard, with_entropy, chunk_tokens)  # [T, 2|3]
    gathered = _all_gather_cat(local.unsqueeze(1), tp_group, dim=1)  # [T, R, 2|3]
    return _combine_stats(gathered, with_entropy)


def _flatten(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    return logits.reshape(-1, logits.shape[-1])


def vocab_parallel_log_softmax_stats(
    logits: torch.Tensor, tp_group, vocab_size: int, chunk_tokens: int | None = None
) -> LogSoftmaxStats:
    """Global max and log-sum-exp per token of sharded logits ``[..., V_local]`` (no gradient)."""
    flat = _flatten(logits)
    shard = vocab_shard(flat.shape[-1], tp_group, vocab_size)
    with torch.no_grad():
        stats = _softmax_stats(flat, shard, tp_group, False, chunk_tokens)
    lead = logits.shape[:-1]
    return LogSoftmaxStats(stats.max.reshape(lead), stats.lse.reshape(lead), None)


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.is_floating_point():
        raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got range [{int(ids.min())}, {int(ids.max())}]"
        )


def _gather_logits_at(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard, tp_group):
    """Global logits at global ``ids [T, m]``: each id is read by the one rank that owns it."""
    local_ids = ids - shard.start
    owned = (local_ids >= 0) & (local_ids < shard.valid_size)
    picked = logits.gather(-1, local_ids.clamp(0, shard.local_size - 1)).to(_compute_dtype(logits.dtype))
    picked = torch.where(owned, picked, torch.zeros_like(picked))
    return _all_reduce_sum(picked, tp_group), local_ids, owned


@_fused
def _chunk_grad(z, lse, entropy, grad_sum, grad_entropy):
    """d/dz of ``sum_i g_i lp(id_i) + g_H H`` for one chunk ``[C, V_valid]``, without the one-hot part.

    ``d lp(v)/dz_j = 1[j = v] - p_j`` and ``dH/dz_j = -p_j (lp_j + H)``. Two chunk-sized buffers: the
    log-probs (turned in place into the per-column coefficient) and the probabilities (into the gradient).
    """
    log_p = torch.sub(z, lse.unsqueeze(-1)).clamp_min_(_LOG_ZERO)  # exp(_LOG_ZERO) == 0 exactly
    grad = log_p.exp()
    if grad_entropy is None:
        return grad.mul_(-grad_sum.unsqueeze(-1))
    coefficient = (
        log_p.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_sum.unsqueeze(-1))
    )
    return grad.mul_(coefficient).neg_()


def _outside(z: torch.Tensor, index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """A copy of the chunk ``z [C, V_valid]`` with -inf at the owned ids of ``index [C, m]`` (local
    columns). "amin" makes the non-owned ids, which point at a clamped column, write back that column's own
    value, so the result does not depend on the order of duplicate indices."""
    minus_inf = torch.full(index.shape, float("-inf"), dtype=z.dtype, device=z.device)
    excluded = torch.where(owned, minus_inf, z.gather(-1, index))
    return z.scatter_reduce(-1, index, excluded, "amin")


def _tail_grad(z, index, owned, lse_tail, grad_tail):
    """``grad_tail * pi_j / tail`` for the columns ``j`` outside the ids, 0 at the ids ``[C, V_valid]``.

    The ``- grad_tail * pi_j`` half of ``d log(tail) / dz_j`` joins the per-token sum of the other terms;
    this half never forms ``pi_j / tail`` at an excluded id, so nothing cancels when the tail is tiny.
    """
    finite = torch.isfinite(lse_tail)
    lse_tail = torch.where(finite, lse_tail, torch.zeros_like(lse_tail))
    grad_tail = torch.where(finite, grad_tail, torch.zeros_like(grad_tail))
    log_q = torch.sub(_outside(z, index, owned), lse_tail.unsqueeze(-1)).clamp_min_(_LOG_ZERO)
    return log_q.exp_().mul_(grad_tail.unsqueeze(-1))


def _write_grad_chunk(out, z, lse, entropy, grad_sum, grad_entropy, onehot_index, grad_onehot, tail=None):
    """Write the gradient of one chunk of rows, one-hot part included, into ``out [C, V_valid]``.

    ``tail``: ``(index, owned, lse_tail, grad_tail)`` of the log-mass outside the ids, when requested."""
    if tail is None:
        grad = _chunk_grad(z, lse, entropy, grad_sum, grad_entropy)
    else:
        index, owned, lse_tail, grad_tail = tail
        grad = _chunk_grad(z, lse, entropy, grad_sum + grad_tail, grad_entropy)
        grad.add_(_tail_grad(z, index, owned, lse_tail, grad_tail))
    grad.scatter_add_(-1, onehot_index, grad_onehot)
    out.copy_(grad)


def _local_tail_stats(logits, shard: VocabShard, index, owned, chunk_tokens) -> torch.Tensor:
    """Per token ``(m_r, s_r)`` ``[T, 2]`` of this rank's columns outside the ids (``_local_stats``)."""
    dtype = _compute_dtype(logits.dtype)
    stats = torch.zeros(logits.shape[0], 2, dtype=dtype, device=logits.device)
    stats[:, 0] = float("-inf")
    if shard.valid_size == 0:
        return stats
    for rows in _chunks(logits.shape[0], shard.local_size, chunk_tokens, logits.device):
        z = _outside(logits[rows, : shard.valid_size], index[rows], owned[rows])
        local_max, sum_exp, _ = _chunk_stats(z, dtype, False)
        stats[rows, 0], stats[rows, 1] = local_max, sum_exp
    return stats


def _tail_log_sum_exp(logits, shard: VocabShard, tp_group, local_ids, owned, chunk_tokens) -> torch.Tensor:
    """Global log-sum-exp ``[T]`` of the true vocabulary minus the given ids (one all-gather)."""
    index = local_ids.clamp(0, max(shard.valid_size - 1, 0))
    local = _local_tail_stats(logits, shard, index, owned, chunk_tokens)  # [T, 2]
    gathered = _all_gather_cat(local.unsqueeze(1), tp_group, dim=1)  # [T, R, 2]
    return _combine_stats(gathered, False).lse


class _VocabParallelTokenStats(torch.autograd.Function):
    """Log-probs at given global ids, (optionally) the entropy and the log-mass outside some of the ids,
    from vocab-sharded logits.

    Shapes: ``logits [T, V_local]`` (sharded on the last dim over ``tp_group``), ``ids [T, m]`` global
    ids (may straddle shards); outputs ``lp [T, m]``, ``entropy [T]`` and ``lp_tail [T]`` = log of the
    probability outside ``ids[:, tail_from:]`` (zeros when not requested), all replicated on every TP
    rank. The tail is summed over its own columns (never ``1 - sum``), so it stays exact however small.
    Forward: all-gather of per-rank softmax statistics (twice with the tail), all-reduce of the gathered
    logits. Backward: no collective; the gradient of the local columns is rebuilt chunk by chunk from the
    saved logits and log-sum-exps.
    """

    @staticmethod
    def forward(
        ctx, logits, ids, tp_group, vocab_size, with_entropy, chunk_tokens, inplace_backward, tail_from
    ):
        shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
        stats = _softmax_stats(logits, shard, tp_group, with_entropy, chunk_tokens)
        picked, local_ids, owned = _gather_logits_at(logits, ids, shard, tp_group)
        log_probs = picked - stats.lse.unsqueeze(-1)
        entropy = stats.entropy if with_entropy else torch.zeros_like(stats.lse)
        lse_tail = torch.zeros_like(stats.lse)
        if tail_from is not None:
            tail_ids = (local_ids[:, tail_from:], owned[:, tail_from:])
            lse_tail = _tail_log_sum_exp(logits, shard, tp_group, *tail_ids, chunk_tokens)
        lp_tail = lse_tail - stats.lse if tail_from is not None else torch.zeros_like(stats.lse)
        ctx.save_for_backward(logits, local_ids, owned, stats.lse, entropy, lse_tail)
        ctx.config = (shard, with_entropy, chunk_tokens, inplace_backward, tail_from)
        return log_probs, entropy, lp_tail

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_lp_tail):
        logits, local_ids, owned, lse, entropy, lse_tail = ctx.saved_tensors
        shard, with_entropy, chunk_tokens, inplace_backward, tail_from = ctx.config
        grad_entropy = grad_entropy if with_entropy else None
        grad_logits = logits if inplace_backward else torch.empty_like(logits)
        grad_logits[:, shard.valid_size :] = 0  # padded columns take no gradient
        nones = (None,) * 7
        if shard.valid_size == 0:
            return grad_logits, *nones
        grad_sum = grad_log_probs.sum(-1)
        grad_onehot = torch.where(owned, grad_log_probs, torch.zeros_like(grad_log_probs))
        onehot_index = local_ids.clamp(0, shard.valid_size - 1)  # non-owned ids add exact zeros
        for rows in _chunks(logits.shape[0], shard.local_size, chunk_tokens, logits.device):
            tail = None
            if tail_from is not None:
                index, tail_owned = onehot_index[rows, tail_from:], owned[rows, tail_from:]
                tail = (index, tail_owned, lse_tail[rows], grad_lp_tail[rows])
            _write_grad_chunk(
                grad_logits[rows, : shard.valid_size],
                logits[rows, : shard.valid_size],
                lse[rows],
                entropy[rows],
                grad_sum[rows],
                None if grad_entropy is None else grad_entropy[rows],
                onehot_index[rows],
                grad_onehot[rows],
                tail,
            )
        return grad_logits, *nones


def vocab_parallel_token_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    tp_group,
    vocab_size: int,
    with_entropy: bool = True,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused student signals: log-probs at ``ids [..., m]`` and full-vocabulary entropy ``[...]``.

    One pass over the vocabulary serves both, and one backward pass returns the gradient of any loss
    built from them. ``inplace_backward=True`` overwrites ``logits`` with its gradient during backward:
    use it only when nothing else reads those logits afterwards (a model's output layer, as usual).
    ``vocab_parallel_token_stats_with_tail`` also returns the log-mass outside some of the ids.
    """
    log_probs, entropy, _ = _token_stats(logits, ids, tp_group, vocab_size, with_entropy, chunk_tokens,
                                         inplace_backward, None)  # fmt: skip
    return log_probs, entropy


def vocab_parallel_token_stats_with_tail(
    logits: torch.Tensor,
    ids: torch.Tensor,
    tp_group,
    vocab_size: int,
    tail_from: int,
    with_entropy: bool = True,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``vocab_parallel_token_stats`` plus ``lp_tail [...]``: the log of the probability outside the ids
    ``ids[..., tail_from:]`` (the teacher's top-k, for the ``tail`` forward-KL family), differentiable.

    The tail is a log-sum-exp over its own columns, not ``1 - sum(top-k)``, so it and its gradient stay
    exact in fp32 however little mass is left (``1 - sum`` rounds to 0 below about 1e-7).
    """
    if not 0 <= tail_from <= ids.shape[-1]:
        raise ValueError(f"tail_from = {tail_from} must index the ids' last dimension of {ids.shape[-1]}")
    return _token_stats(logits, ids, tp_group, vocab_size, with_entropy, chunk_tokens, inplace_backward,
                        tail_from)  # fmt: skip


def _token_stats(logits, ids, tp_group, vocab_size, with_entropy, chunk_tokens, inplace_backward, tail_from):
    flat = _flatten(logits)
    if ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)} must be [..., m] over the token dims of logits {tuple(logits.shape)}"
        )
    _check_ids(ids, vocab_size)
    flat_ids = ids.reshape(flat.shape[0], -1).to(torch.int64)
    log_probs, entropy, lp_tail = _VocabParallelTokenStats.apply(
        flat, flat_ids, tp_group, vocab_size, with_entropy, chunk_tokens, inplace_backward, tail_from
    )
    lead = logits.shape[:-1]
    return log_probs.reshape(ids.shape), entropy.reshape(lead), lp_tail.reshape(lead)


def vocab_parallel_log_probs_at(logits, ids, tp_group, vocab_size, chunk_tokens=None, inplace_backward=False):
    """Full-vocabulary log-probs of sharded logits at global ``ids [..., m]`` (differentiable)."""
    log_probs, _ = vocab_parallel_token_stats(
        logits, ids, tp_group, vocab_size, False, chunk_tokens, inplace_backward
    )
    return log_probs


def vocab_parallel_log_prob(
    logits, token_ids, tp_group, vocab_size, chunk_tokens=None, inplace_backward=False
):
    """Log-prob of the given token per position: ``token_ids [...]`` -> ``[...]`` (differentiable)."""
    return vocab_parallel_log_probs_at(
        logits, token_ids.unsqueeze(-1), tp_group, vocab_size, chunk_tokens, inplace_backward
    ).squeeze(-1)


def vocab_parallel_entropy(logits, tp_group, vocab_size, chunk_tokens=None):
    """Full-vocabulary entropy per token ``[...]`` of sharded logits (differentiable)."""
    ids = torch.zeros(*logits.shape[:-1], 0, dtype=torch.int64, device=logits.device)
    _, entropy = vocab_parallel_token_stats(logits, ids, tp_group, vocab_size, True, chunk_tokens)
    return entropy


def _local_topk_candidates(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k`` local candidates per row ``[C, k]`` (values, local column ids ascending).

    Ties at the k-th value are broken towards the lowest id, so the selection does not depend on how
    ``torch.topk`` orders equal values on a given device.
    """
    kth_value = z.topk(k, dim=-1).values[:, -1:]
    above = z > kth_value
    at_kth = z == kth_value
    needed = k - above.sum(-1, keepdim=True)
    take = above | (at_kth & (at_kth.cumsum(-1, dtype=torch.int32) <= needed))
    columns = take.nonzero()[:, 1].reshape(z.shape[0], k)  # row-major, so ascending per row
    return z.gather(-1, columns), columns


def _pad_candidates(values, ids, k: int, pad_id_start: int):
    """Pad ``[T, j]`` candidates to ``[T, k]`` with -inf values and ids past the vocabulary, which lose
    every tie against real tokens."""
    missing = k - values.shape[-1]
    if missing == 0:
        return values, ids
    pad_values = values.new_full((values.shape[0], missing), float("-inf"))
    pad_ids = torch.arange(pad_id_start, pad_id_start + missing, device=ids.device).expand(ids.shape[0], -1)
    return torch.cat([values, pad_values], -1), torch.cat([ids, pad_ids], -1)


def _shard_topk_candidates(logits: torch.Tensor, k: int, shard: VocabShard, padded_vocab: int, chunk_tokens):
    """This rank's ``k`` best (value, global id) per token, ids ascending; ``[T, k]`` each."""
    local_k = min(k, shard.valid_size)
    values = torch.empty(logits.shape[0], local_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(logits.shape[0], local_k, dtype=torch.int64, device=logits.device)
    if local_k > 0:
        for rows in _chunks(logits.shape[0], shard.local_size, chunk_tokens, logits.device):
            values[rows], ids[rows] = _local_topk_candidates(logits[rows, : shard.valid_size], local_k)
    return _pad_candidates(values, ids + shard.start, k, padded_vocab + shard.start)


@torch.no_grad()
def vocab_parallel_topk(logits, k: int, tp_group, vocab_size: int, chunk_tokens: int | None = None):
    """Exact global top-k of a vocab-sharded distribution: ``(ids [..., k], log_probs [..., k])``.

    Sorted by decreasing probability, ties to the lower id. Each rank proposes its own ``k`` best
    (fewer when its shard is smaller than ``k``), one all-gather of ``[T, k]`` candidates merges them,
    and a stable sort keeps the global order. No gradient: this is the teacher's side.
    """
    if not 0 < k <= vocab_size:
        raise ValueError(f"top-k needs 0 < k <= vocab_size ({vocab_size}); got k={k}")
    flat = _flatten(logits)
    shard = vocab_shard(flat.shape[-1], tp_group, vocab_size)
    _, world = _tp_rank_and_size(tp_group)
    stats = _softmax_stats(flat, shard, tp_group, False, chunk_tokens)
    values, ids = _shard_topk_candidates(flat, k, shard, flat.shape[-1] * world, chunk_tokens)
    all_values = _all_gather_cat(values, tp_group, dim=-1)  # [T, R*k], ids ascending across ranks
    all_ids = _all_gather_cat(ids, tp_group, dim=-1)
    order = torch.sort(all_values, dim=-1, descending=True, stable=True).indices[:, :k]
    top_ids = all_ids.gather(-1, order)
    top_log_probs = all_values.gather(-1, order).to(stats.lse.dtype) - stats.lse.unsqueeze(-1)
    lead = logits.shape[:-1]
    return top_ids.reshape(*lead, k), top_log_probs.reshape(*lead, k)


def vocab_parallel_topk_forward_kl(
    logits, teacher_ids, lp_teacher_topk, tp_group, vocab_size, family="raw", chunk_tokens=None
):
    """Per-token top-k forward KL of the student (sharded ``logits``) against the teacher's top-k.

    ``teacher_ids``/``lp_teacher_topk [..., k]`` come from ``vocab_parallel_topk`` on the teacher. The
    student's log-probs at those ids are gathered without the vocabulary leaving its shards; the gradient
    w.r.t. the logits is the KL's hand-written derivative pushed through the gather's backward.
    """
    k = teacher_ids.shape[-1]
    if family == "tail":  # the student's tail mass summed over its own columns: exact however small
        lp_student_topk, _, lp_tail = vocab_parallel_token_stats_with_tail(
            logits, teacher_ids, tp_group, vocab_size, 0, False, chunk_tokens
        )
        lp_tail = lp_tail.reshape(-1)
    else:
        lp_student_topk = vocab_parallel_log_probs_at(logits, teacher_ids, tp_group, vocab_size, chunk_tokens)
        lp_tail = None
    kl = topk_forward_kl(lp_student_topk.reshape(-1, k), lp_teacher_topk.reshape(-1, k), family, lp_tail)
    return kl.reshape(teacher_ids.shape[:-1])


def vocab_parallel_jsd_teacher_term(logits, teacher_ids, lp_teacher_topk, tp_group, vocab_size, beta=0.5):
    """Teacher half of the top-k JSD, ``sum_{V_k} pi_T log(pi_T / pi_M)``, from sharded student logits."""
    lp_student_topk = vocab_parallel_log_probs_at(logits, teacher_ids, tp_group, vocab_size)
    k = teacher_ids.shape[-1]
    term = jsd_topk_teacher_term(lp_student_topk.reshape(-1, k), lp_teacher_topk.reshape(-1, k), beta)
    return term.reshape(teacher_ids.shape[:-1])


@torch.no_grad()
def vocab_parallel_agreement_ratio(student_logits, teacher_logits, token_ids, tp_group, vocab_size):
    """``min(pi_T(x) / pi_S(x), 1)`` per token from two vocab-sharded logits on the same TP group."""
    lp_student = vocab_parallel_log_prob(student_logits, token_ids, tp_group, vocab_size)
    lp_teacher = vocab_parallel_log_prob(teacher_logits, token_ids, tp_group, vocab_size)
    return agreement_ratio(lp_teacher, lp_student)
