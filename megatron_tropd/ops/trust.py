"""The trust-region draw: ``M ~ Bernoulli(P_trust)`` from a stateless, counter-based hash.

The uniform for a token is a pure function of (seed, step, sample id, token index). Every rank, every
microbatch split and every re-run after a resume draws exactly the same mask, with no RNG state to keep
in sync or to checkpoint.

The hash is Chris Wellons' ``lowbias32`` finaliser applied to each 32-bit word of the key in turn. It is
computed in int64 arithmetic with the 32x32-bit products split into 16-bit halves, so nothing overflows
and the result is identical on every device and backend.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
# Fixed offset mixed into the seed so that seed 0 does not start the chain at the hash's fixed point.
_SEED_SALT = 0x9E3779B9


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    low = x * (constant & 0xFFFF)  # < 2**48
    high = ((x * (constant >> 16)) & 0xFFFF) << 16  # only the bits that survive the mod matter
    return (low + high) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def _absorb(state: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """Mix one key (any int64) into the hash state, 32 bits at a time."""
    state = _lowbias32(state ^ (word & _MASK32))
    return _lowbias32(state ^ ((word >> 32) & _MASK32))


def trust_uniform(seed: int, step: int, sample_ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Uniform ``(0, 1)`` float64 per token, a pure function of (seed, step, sample id, token index).

    ``sample_ids`` and ``token_index`` are integer tensors of the same shape (``[T]`` or ``[B, S]``);
    sample ids must be global (unique in the rollout batch), not local to a rank or microbatch.
    """
    if sample_ids.shape != token_index.shape:
        raise ValueError(
            f"sample_ids {tuple(sample_ids.shape)} and token_index {tuple(token_index.shape)} must match"
        )
    if sample_ids.is_floating_point() or token_index.is_floating_point():
        raise ValueError("sample_ids and token_index must be integer tensors")
    sample_ids = sample_ids.to(torch.int64)
    state = torch.full_like(sample_ids, (seed ^ _SEED_SALT) & _MASK32)
    state = _absorb(state, torch.full_like(sample_ids, seed >> 32))
    state = _absorb(state, torch.full_like(sample_ids, step))
    state = _absorb(state, sample_ids)
    state = _absorb(state, token_index.to(torch.int64))
    # Two further rounds give 64 bits; the top 53 make an exactly representable double in (0, 1).
    high = _lowbias32(state ^ 0x5BD1E995)
    bits53 = (state << 21) | (high >> 11)
    return (bits53.to(torch.float64) + 0.5) / float(1 << 53)


def draw_trust_mask(
    p_trust: torch.Tensor, seed: int, step: int, sample_ids: torch.Tensor, token_index: torch.Tensor
) -> torch.Tensor:
    """``M ~ Bernoulli(p_trust)`` per token (bool, same shape as ``p_trust``), reproducible everywhere."""
    if p_trust.shape != sample_ids.shape:
        raise ValueError(
            f"p_trust {tuple(p_trust.shape)} must have the shape of sample_ids {tuple(sample_ids.shape)}"
        )
    uniform = trust_uniform(seed, step, sample_ids.to(p_trust.device), token_index.to(p_trust.device))
    return uniform < p_trust.detach().to(torch.float64)
