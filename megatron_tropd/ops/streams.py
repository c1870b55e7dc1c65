"""Named random streams: every random choice of a run is a pure function of its keys.

Three things in a run are random: the trust-region draw (per token), the sampling of generated tokens
(per token) and the length of a guided rollout's teacher prefix (per rollout). Each has its own
``Stream``; its uniform comes from one counter-based hash of (seed, stream key, sample id, index). No
stream keeps state, so every rank, every microbatch split, every batching of requests and every re-run
after a resume draws the same numbers, and there is no RNG state to checkpoint.

The hash is Chris Wellons' ``lowbias32`` finaliser applied to each 32-bit word of the key in turn. It is
computed in int64 arithmetic with the 32x32-bit products split into 16-bit halves, so nothing overflows
and the result is identical on every device and backend.

How each stream folds its name into the key (``_stream_key``) is fixed: changing it would change the
draws of every existing run, and a run resumed on a newer release must draw what the older one would.
"""

from __future__ import annotations

import enum

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


# Sampling's key word. Its uniform is keyed by (seed, sample id, position) only: sample ids are unique
# across the steps of a run, and a request must draw the same tokens whichever step or batch carries it.
_SAMPLING_WORD = 0x534D504C
# The prefix-length stream offsets the seed so its draws are independent of the trust stream's.
_PREFIX_SEED_OFFSET = 0x5EED


class Stream(enum.Enum):
    """The run's random streams."""

    TRUST = "trust"
    """``M ~ Bernoulli(P_trust)``: index = label position, keyed by step."""
    SAMPLING = "sampling"
    """Generated tokens: index = position of the drawn token; independent of the step."""
    PREFIX_LENGTH = "prefix_length"
    """A guided rollout's teacher-prefix length: index 0, keyed by step."""


def _stream_key(stream: Stream, seed: int, step: int) -> tuple[int, int]:
    """The (seed, word) pair that ``stream`` at ``step`` feeds the hash."""
    if stream is Stream.TRUST:
        return seed, step
    if stream is Stream.SAMPLING:
        return seed, _SAMPLING_WORD
    if stream is Stream.PREFIX_LENGTH:
        return seed + _PREFIX_SEED_OFFSET, step
    raise ValueError(f"unknown random stream {stream!r}")


def stream_uniform(
    stream: Stream, seed: int, sample_ids: torch.Tensor, index: torch.Tensor, step: int = 0
) -> torch.Tensor:
    """Uniform ``(0, 1)`` float64 per element: a pure function of (stream, seed, step, sample id, index).

    ``sample_ids`` and ``index`` are integer tensors of the same shape (``[T]`` or ``[B, S]``); sample ids
    must be global (unique in the rollout batch), not local to a rank or microbatch.
    """
    seed, word = _stream_key(stream, seed, step)
    return _hash_uniform(seed, word, sample_ids, index)


def _hash_uniform(seed: int, word: int, sample_ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    if sample_ids.shape != token_index.shape:
        raise ValueError(
            f"sample_ids {tuple(sample_ids.shape)} and token_index {tuple(token_index.shape)} must match"
        )
    if sample_ids.is_floating_point() or token_index.is_floating_point():
        raise ValueError("sample_ids and token_index must be integer tensors")
    sample_ids = sample_ids.to(torch.int64)
    state = torch.full_like(sample_ids, (seed ^ _SEED_SALT) & _MASK32)
    state = _absorb(state, torch.full_like(sample_ids, seed >> 32))
    state = _absorb(state, torch.full_like(sample_ids, word))
    state = _absorb(state, sample_ids)
    state = _absorb(state, token_index.to(torch.int64))
    # Two further rounds give 64 bits; the top 53 make an exactly representable double in (0, 1).
    high = _lowbias32(state ^ 0x5BD1E995)
    bits53 = (state << 21) | (high >> 11)
    return (bits53.to(torch.float64) + 0.5) / float(1 << 53)
