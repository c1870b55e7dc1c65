"""Off-policy guidance: how long a teacher prefix a guided rollout starts from.

The maximum prefix length starts at the generation budget and anneals to 0 over training (cosine by
default), so training ends fully on-policy. Each guided rollout draws ``l ~ U[0, min(L_max(step),
len(teacher response))]`` from the prefix-length random stream (``ops/streams.py``: seed, step, sample
id), so every rank and every re-run after a resume cuts the same prefixes.
"""

from __future__ import annotations

import math

import torch

from megatron_tropd.ops.streams import Stream, stream_uniform


def max_prefix_length(step: int, total_steps: int, max_new_tokens: int, schedule: str = "cosine") -> int:
    """``L_max(step)``: ``max_new_tokens`` at step 0, 0 at the last step."""
    if total_steps <= 1:
        return 0 if schedule != "constant" else max_new_tokens
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "cosine":
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        fraction = 1.0 - progress
    elif schedule == "constant":
        fraction = 1.0
    else:
        raise ValueError(f"unknown guidance schedule {schedule!r}; choose cosine, linear or constant")
    return int(round(fraction * max_new_tokens))


def draw_prefix_lengths(
    seed: int, step: int, sample_ids: list[int], response_lengths: list[int], limit: int
) -> list[int]:
    """``l ~ U{0, ..., min(limit, len(response))}`` per guided rollout (integers, inclusive)."""
    if len(sample_ids) != len(response_lengths):
        raise ValueError("one response length per guided sample id is needed")
    if not sample_ids:
        return []
    ids = torch.tensor(sample_ids, dtype=torch.int64)
    uniform = stream_uniform(Stream.PREFIX_LENGTH, seed, ids, torch.zeros_like(ids), step=step)
    bounds = torch.tensor([min(limit, length) for length in response_lengths], dtype=torch.float64)
    return torch.floor(uniform * (bounds + 1)).to(torch.int64).clamp_max(bounds.to(torch.int64)).tolist()


def guided_samples_per_prompt(samples_per_prompt: int, guided_fraction: float, enabled: bool) -> int:
    """How many of each prompt's rollouts get a teacher prefix (the first ones, by sample index)."""
    return round(samples_per_prompt * guided_fraction) if enabled else 0
