"""Logit problems shared by the vocab-parallel tests: each is built identically on every rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    vocab_size: int  # true vocabulary
    extra_padding: int  # padded columns beyond the true vocabulary (before rounding up to the TP size)
    num_tokens: int
    k: int
    kind: str = "random"  # random | one_shard | straddle | ties | neg_inf | tiny_tail


CASES = [
    Case("random_vocab37", 37, 0, 23, 5),
    Case("padded_vocab", 29, 9, 19, 6),
    Case("topk_on_one_shard", 40, 0, 17, 4, "one_shard"),
    Case("topk_straddles_shards", 40, 0, 17, 8, "straddle"),
    Case("k_larger_than_shard", 41, 3, 13, 15),
    Case("ties", 36, 4, 21, 7, "ties"),
    Case("neg_inf_logits", 38, 2, 15, 6, "neg_inf"),
    Case("tiny_student_tail", 44, 2, 11, 6, "tiny_tail"),
]
# tiny_tail: the student's mass outside the teacher's top-k is about 1e-9, below what 1 - sum(top-k)
# resolves in fp32 (the tail forward-KL family must sum the tail itself).
TINY_TAIL_MASS = 1e-9


def _log_mass(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unnormalised log-mass of ``logits`` over ``mask``, per row ``[T, 1]``."""
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1, keepdim=True)


def padded_vocab(case: Case, tp: int) -> int:
    return -(-(case.vocab_size + case.extra_padding) // tp) * tp


def make_logits(case: Case, tp: int, dtype=torch.float64, seed: int = 0):
    """Teacher and student logits ``[T, V_padded]``, target ids ``[T]`` and loss weights for the case."""
    generator = torch.Generator().manual_seed(seed + sum(map(ord, case.name)))
    shape = (case.num_tokens, padded_vocab(case, tp))
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * 2.0
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5
    if case.kind == "one_shard":  # the teacher's best ids all live in the first few columns
        teacher[:, :6] += 8.0
    elif case.kind == "straddle":  # the teacher's best ids sit around the middle of the vocabulary
        middle = case.vocab_size // 2
        teacher[:, middle - 5 : middle + 5] += 8.0
    elif case.kind == "ties":  # few distinct values: many exact ties, also at the k-th place
        teacher = teacher.round()
        student = student.round()
    elif case.kind == "neg_inf":  # banned tokens, in both models, some inside the teacher's top-k
        banned = torch.rand(shape, generator=generator) < 0.3
        banned[:, 0] = False
        teacher = teacher.masked_fill(banned & (torch.arange(shape[1]) % 2 == 0), float("-inf"))
        student = student.masked_fill(banned, float("-inf"))
    elif case.kind == "tiny_tail":  # the student follows the teacher's top-k, leaving ~1e-9 outside
        top = teacher[:, : case.vocab_size].topk(case.k, dim=-1).indices
        inside = torch.zeros(shape, dtype=torch.bool).scatter(-1, top, True)
        outside = ~inside & (torch.arange(shape[1]) < case.vocab_size)
        shift = _log_mass(student, inside) - _log_mass(student, outside) + math.log(TINY_TAIL_MASS)
        student = torch.where(outside, student + shift, student)
    # garbage in the padded columns must never leak into any result
    teacher[:, case.vocab_size :] = 50.0
    student[:, case.vocab_size :] = 50.0
    targets = torch.randint(0, case.vocab_size, (case.num_tokens,), generator=generator)
    if case.kind == "neg_inf":
        finite = torch.isfinite(student[torch.arange(case.num_tokens), targets])
        targets = torch.where(finite, targets, torch.zeros_like(targets))
    weights = torch.randn(case.num_tokens, case.k + 2, generator=generator, dtype=torch.float64)
    return teacher.to(dtype), student.to(dtype), targets, weights.to(dtype)


def shard(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    local = full.shape[-1] // tp
    return full[..., rank * local : (rank + 1) * local]
