"""Single-device oracles for every op in ``vocab_parallel.py``: the tests' ground truth.

Dense and obvious on purpose: full-vocabulary ``log_softmax`` on the whole batch, autograd for every
gradient, no chunking, no hand-written backward. Each function has the name and arguments of its
vocab-parallel twin minus ``tp_group`` and takes the full (padded) logits ``[..., V]``; columns at or
beyond ``vocab_size`` are dropped first.
"""

from __future__ import annotations

import torch


def _log_softmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(
        logits[..., :vocab_size].to(torch.promote_types(logits.dtype, torch.float32)), -1
    )


def vocab_parallel_log_softmax_stats(logits, vocab_size):
    """``(max, lse)`` per token over the true vocabulary."""
    true_logits = logits[..., :vocab_size].to(torch.promote_types(logits.dtype, torch.float32))
    return true_logits.max(-1).values, torch.logsumexp(true_logits, -1)


def vocab_parallel_log_probs_at(logits, ids, vocab_size):
    return _log_softmax(logits, vocab_size).gather(-1, ids)


def vocab_parallel_log_prob(logits, token_ids, vocab_size):
    return vocab_parallel_log_probs_at(logits, token_ids.unsqueeze(-1), vocab_size).squeeze(-1)


def vocab_parallel_entropy(logits, vocab_size):
    """``H = lse - E_p[z]``; -inf logits carry no mass and are left out of the expectation."""
    true_logits = logits[..., :vocab_size].to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(true_logits, -1)
    finite_logits = torch.where(torch.isfinite(true_logits), true_logits, torch.zeros_like(true_logits))
    return torch.logsumexp(true_logits, -1) - (p * finite_logits).sum(-1)


def vocab_parallel_token_stats(logits, ids, vocab_size):
    return vocab_parallel_log_probs_at(logits, ids, vocab_size), vocab_parallel_entropy(logits, vocab_size)


def log_mass_outside(logits, ids, vocab_size):
    """``log sum_{v not in ids} pi(v)`` per token: the log-probs outside ``ids`` summed directly."""
    log_p = _log_softmax(logits, vocab_size)
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)
    return torch.logsumexp(torch.where(outside, log_p, torch.full_like(log_p, float("-inf"))), -1)


def vocab_parallel_token_stats_with_tail(logits, ids, vocab_size, tail_from):
    lp, entropy = vocab_parallel_token_stats(logits, ids, vocab_size)
    return lp, entropy, log_mass_outside(logits, ids[..., tail_from:], vocab_size)


@torch.no_grad()
def vocab_parallel_topk(logits, k, vocab_size):
    """Top-k by a stable descending sort of the whole vocabulary: ties go to the lower id."""
    log_p = _log_softmax(logits, vocab_size)
    ids = torch.sort(logits[..., :vocab_size], dim=-1, descending=True, stable=True).indices[..., :k]
    return ids, log_p.gather(-1, ids)


def _plogp_ratio(p, log_p, log_q):
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def vocab_parallel_topk_forward_kl(logits, teacher_ids, lp_teacher_topk, vocab_size, family="raw"):
    """The three families written out over the dense student distribution."""
    log_p_student = _log_softmax(logits, vocab_size)
    lp_s = log_p_student.gather(-1, teacher_ids)
    p_t = lp_teacher_topk.exp()
    if family == "raw":
        return _plogp_ratio(p_t, lp_teacher_topk, lp_s).sum(-1)
    if family == "renorm":
        log_q_t = lp_teacher_topk - torch.logsumexp(lp_teacher_topk, -1, keepdim=True)
        log_q_s = lp_s - torch.logsumexp(lp_s, -1, keepdim=True)
        return _plogp_ratio(log_q_t.exp(), log_q_t, log_q_s).sum(-1)
    if family == "tail":
        tail_t = (1 - p_t.sum(-1)).clamp_min(0)
        lp_tail_s = log_mass_outside(logits, teacher_ids, vocab_size)
        tail_term = _plogp_ratio(tail_t, tail_t.clamp_min(1e-300).log(), lp_tail_s)
        return _plogp_ratio(p_t, lp_teacher_topk, lp_s).sum(-1) + tail_term
    raise ValueError(f"unknown family {family!r}")


def vocab_parallel_jsd_teacher_term(logits, teacher_ids, lp_teacher_topk, vocab_size, beta=0.5):
    p_s = _log_softmax(logits, vocab_size).gather(-1, teacher_ids).exp()
    p_t = lp_teacher_topk.exp()
    p_mix = beta * p_t + (1 - beta) * p_s
    return _plogp_ratio(p_t, lp_teacher_topk, p_mix.log()).sum(-1)


@torch.no_grad()
def vocab_parallel_agreement_ratio(student_logits, teacher_logits, token_ids, vocab_size):
    p_s = vocab_parallel_log_prob(student_logits, token_ids, vocab_size).exp()
    p_t = vocab_parallel_log_prob(teacher_logits, token_ids, vocab_size).exp()
    return torch.minimum(p_t / p_s, torch.ones_like(p_s))


def vocab_parallel_full_divergence(
    logits, teacher_logits, vocab_size, kind="forward_kl", beta=0.5, token_mask=None
):
    """Oracle of ``full_vocab.vocab_parallel_full_divergence``, from the dense teacher logits ``[..., V]``
    (``h_T @ W_T^T``) instead of its hidden states and weight: per-token divergence ``[...]``.

    ``forward_kl`` = KL(p_T || p_S), ``reverse_kl`` = KL(p_S || p_T), ``jsd`` = beta KL(p_T || M) +
    (1 - beta) KL(p_S || M) with M = beta p_T + (1 - beta) p_S (beta: the teacher's weight, GKD's
    convention). Masked tokens (``token_mask`` False) are 0. The teacher is detached.
    """
    lp_s = _log_softmax(logits, vocab_size)
    lp_t = _log_softmax(teacher_logits.detach(), vocab_size)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if kind == "forward_kl":
        value = _plogp_ratio(p_t, lp_t, lp_s).sum(-1)
    elif kind == "reverse_kl":
        value = _plogp_ratio(p_s, lp_s, lp_t).sum(-1)
    elif kind == "jsd":
        log_mix = (beta * p_t + (1 - beta) * p_s).log()
        value = beta * _plogp_ratio(p_t, lp_t, log_mix).sum(-1) + (1 - beta) * _plogp_ratio(
            p_s, lp_s, log_mix
        ).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return value if token_mask is None else torch.where(token_mask, value, torch.zeros_like(value))
