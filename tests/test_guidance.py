"""The guidance schedule and the prefix-length draw."""

from __future__ import annotations

import math

import pytest

from megatron_tropd.guidance import draw_prefix_lengths, guided_samples_per_prompt, max_prefix_length


def test_cosine_schedule_anneals_from_budget_to_zero():
    lengths = [max_prefix_length(step, 11, 1000) for step in range(11)]
    assert lengths[0] == 1000 and lengths[-1] == 0
    assert lengths[5] == round(0.5 * (1 + math.cos(math.pi * 0.5)) * 1000)
    assert all(a >= b for a, b in zip(lengths, lengths[1:], strict=False))
    assert [max_prefix_length(s, 11, 1000, "linear") for s in (0, 5, 10)] == [1000, 500, 0]
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        max_prefix_length(0, 10, 100, "exp")


def test_prefix_lengths_are_uniform_bounded_and_reproducible():
    sample_ids = list(range(20000))
    lengths = draw_prefix_lengths(3, 7, sample_ids, [50] * 10000 + [5] * 10000, limit=20)
    assert lengths == draw_prefix_lengths(3, 7, sample_ids, [50] * 10000 + [5] * 10000, limit=20)
    first, second = lengths[:10000], lengths[10000:]
    assert min(first) == 0 and max(first) == 20  # bounded by the schedule's limit
    assert max(second) == 5  # bounded by the teacher's response
    for value in range(21):  # U{0..20}: each value ~ 1/21 of the draws
        assert abs(first.count(value) / 10000 - 1 / 21) < 0.015
    assert lengths != draw_prefix_lengths(3, 8, sample_ids, [50] * 10000 + [5] * 10000, limit=20)


def test_guided_share():
    assert guided_samples_per_prompt(4, 0.5, True) == 2
    assert guided_samples_per_prompt(4, 0.5, False) == 0
