"""Per-token divergences on the teacher's top-k support, computed from gathered log-probs.

Everything here works on ``[T, k]`` tensors: the teacher's top-k log-probs and the student's
full-vocabulary log-probs gathered at the same global ids (``vocab_parallel_log_probs_at``). The gradient
w.r.t. the student's logits follows from the gather's own backward, so these functions never touch the
vocabulary and cost ``O(T * k)``.
"""

from __future__ import annotations

import math

import torch

FKL_FAMILIES = ("raw", "renorm", "tail")
# Floor on the student's tail mass in the ``tail`` family when only the top-k log-probs are given: keeps
# log(tail) and its gradient finite when 1 - sum(top-k) rounds to 0 (the student's exact log tail mass,
# when given, is only kept off -inf, at _LOG_ZERO).
TAIL_MASS_FLOOR = 1e-12
_LOG_ZERO = -1.0e4


def check_family(family: str) -> None:
    if family not in FKL_FAMILIES:
        raise ValueError(f"unknown top-k forward-KL family {family!r}; allowed: {', '.join(FKL_FAMILIES)}")


def _xlogx_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log_p - log_q)`` with the convention ``0 * anything = 0`` (teacher mass 0, -inf logits)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler's log1mexp): ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` below ``-log 2``."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _fkl_value_and_grad(lp_s: torch.Tensor, lp_t: torch.Tensor, family: str, lp_tail_s: torch.Tensor | None):
    """Return the per-token KL ``[T]``, its derivative w.r.t. ``lp_s`` ``[T, k]`` and, for ``tail`` with
    the student's log tail mass given, its derivative w.r.t. that ``[T]`` (else None)."""
    p_t = lp_t.exp()
    if family == "raw":
        return _xlogx_ratio(p_t, lp_t, lp_s).sum(-1), -p_t, None
    if family == "renorm":
        log_q_t = lp_t - torch.logsumexp(lp_t, -1, keepdim=True)
        log_q_s = lp_s - torch.logsumexp(lp_s, -1, keepdim=True)
        q_t, q_s = log_q_t.exp(), log_q_s.exp()
        return _xlogx_ratio(q_t, log_q_t, log_q_s).sum(-1), q_s - q_t, None
    # tail: V_k plus one bucket holding the mass outside V_k, both masses as log(1 - top-k mass)
    log_tail_t = log1mexp(torch.logsumexp(lp_t, -1))
    tail_t = log_tail_t.exp()
    in_topk = _xlogx_ratio(p_t, lp_t, lp_s).sum(-1)
    if lp_tail_s is not None:  # summed over the tail's own columns: exact, the gradient bounded
        tail_term = _xlogx_ratio(tail_t, log_tail_t, lp_tail_s.clamp_min(_LOG_ZERO))
        return in_topk + tail_term, -p_t, torch.where(tail_t > 0, -tail_t, torch.zeros_like(tail_t))
    # only the top-k log-probs: the complement is as exact as they are (about 1e-7 of mass in fp32)
    log_tail_s = log1mexp(torch.logsumexp(lp_s, -1)).clamp_min(math.log(TAIL_MASS_FLOOR))
    tail_term = _xlogx_ratio(tail_t, log_tail_t, log_tail_s)
    return in_topk + tail_term, -p_t + (tail_t * (-log_tail_s).exp()).unsqueeze(-1) * lp_s.exp(), None


class _TopKForwardKL(torch.autograd.Function):
    """Top-k forward KL(pi_T || pi_S) per token, with a hand-written backward.

    Inputs: ``lp_student_topk [T, k]`` (differentiable), ``lp_teacher_topk [T, k]`` (constant) and, for
    ``tail``, optionally the student's log tail mass ``[T]`` (differentiable). Forward computes the value
    and its derivatives in one pass (``O(T * k)``); backward only scales the saved derivatives. For
    ``raw`` the derivative is ``-pi_T`` and stays bounded even where the value is +inf (student log-prob
    -inf at a teacher id).
    """

    @staticmethod
    def forward(ctx, lp_student_topk, lp_teacher_topk, family, lp_student_tail):
        compute_dtype = torch.promote_types(lp_student_topk.dtype, torch.float32)
        lp_tail = None if lp_student_tail is None else lp_student_tail.to(compute_dtype)
        kl, d_kl, d_tail = _fkl_value_and_grad(
            lp_student_topk.to(compute_dtype), lp_teacher_topk.to(compute_dtype), family, lp_tail
        )
        ctx.save_for_backward(d_kl, d_tail)
        ctx.input_dtype = lp_student_topk.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        d_kl, d_tail = ctx.saved_tensors
        grad_tail = None if d_tail is None else (grad_kl * d_tail).to(ctx.input_dtype)
        return (grad_kl.unsqueeze(-1) * d_kl).to(ctx.input_dtype), None, None, grad_tail


def _check_topk_pair(lp_student_topk: torch.Tensor, lp_teacher_topk: torch.Tensor) -> None:
    if lp_student_topk.shape != lp_teacher_topk.shape or lp_student_topk.dim() != 2:
        raise ValueError(
            "student and teacher top-k log-probs must both be [tokens, k] with the same shape; got "
            f"student {tuple(lp_student_topk.shape)} and teacher {tuple(lp_teacher_topk.shape)}"
        )


def topk_forward_kl(
    lp_student_topk: torch.Tensor,
    lp_teacher_topk: torch.Tensor,
    family: str = "raw",
    lp_student_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token top-k forward KL ``[T]`` in one of ``FKL_FAMILIES``.

    ``raw`` (paper): ``sum_{V_k} pi_T (lp_T - lp_S)``; ``renorm``: both distributions renormalised inside
    V_k; ``tail``: V_k plus one bucket with the remaining mass of each distribution.

    ``lp_student_tail [T]`` (``tail`` only): the student's log-mass outside V_k summed over its own
    columns (``vocab_parallel_token_stats_with_tail``). Pass it whenever the vocabulary is at hand:
    without it the tail is ``log(1 - sum_{V_k} pi_S)``, which cannot resolve less than about 1e-7 of
    mass from fp32 top-k log-probs, and its gradient w.r.t. the logits then cancels catastrophically.
    """
    check_family(family)
    _check_topk_pair(lp_student_topk, lp_teacher_topk)
    if lp_student_tail is not None:
        if family != "tail":
            raise ValueError(f"lp_student_tail is only read by the 'tail' family, not {family!r}")
        if lp_student_tail.shape != lp_student_topk.shape[:1]:
            raise ValueError(
                f"lp_student_tail must be [T] = [{lp_student_topk.shape[0]}]; "
                f"got {tuple(lp_student_tail.shape)}"
            )
    return _TopKForwardKL.apply(lp_student_topk, lp_teacher_topk.detach(), family, lp_student_tail)


def jsd_topk_teacher_term(
    lp_student_topk: torch.Tensor, lp_teacher_topk: torch.Tensor, beta: float
) -> torch.Tensor:
    """Teacher half of the generalised JSD on V_k: ``sum_{V_k} pi_T log(pi_T / pi_M)`` ``[T]``.

    ``pi_M = beta * pi_T + (1 - beta) * pi_S``, computed in log space so -inf student log-probs are safe.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"JSD beta must lie in (0, 1); got {beta}")
    _check_topk_pair(lp_student_topk, lp_teacher_topk)
    lp_teacher_topk = lp_teacher_topk.detach()
    lp_mix = torch.logaddexp(lp_teacher_topk + math.log(beta), lp_student_topk + math.log1p(-beta))
    return _xlogx_ratio(lp_teacher_topk.exp(), lp_teacher_topk, lp_mix).sum(-1)


def agreement_ratio(lp_teacher: torch.Tensor, lp_student: torch.Tensor) -> torch.Tensor:
    """``P_trust = min(pi_T / pi_S, 1)`` per token: the speculative-decoding acceptance probability."""
    return (lp_teacher - lp_student).clamp_max(0.0).exp()


def topk_mass(lp_student_topk: torch.Tensor) -> torch.Tensor:
    """Mass the student puts on the teacher's top-k ids, per token ``[T]``."""
    return torch.logsumexp(lp_student_topk, -1).exp()
