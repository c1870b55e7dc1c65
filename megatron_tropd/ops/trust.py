"""The trust-region draw: ``M ~ Bernoulli(P_trust)`` from the trust stream of ``streams.py``.

The uniform for a token is a pure function of (seed, step, sample id, token index), so every rank, every
microbatch split and every re-run after a resume draws exactly the same mask.
"""

from __future__ import annotations

import torch

from megatron_tropd.ops.streams import Stream, stream_uniform


def trust_uniform(seed: int, step: int, sample_ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """The trust stream's uniform ``(0, 1)`` float64 per token."""
    return stream_uniform(Stream.TRUST, seed, sample_ids, token_index, step=step)


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
