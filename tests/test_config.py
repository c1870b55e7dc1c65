"""Run-level validation that must fail before any process group starts."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_tropd.config import ParallelConfig, RunConfig
from megatron_tropd.model_config import tiny
from megatron_tropd.topology import ParallelLayout


def test_layout_that_does_not_tile_the_world_lists_the_sizes_that_would():
    with pytest.raises(
        ValueError, match=r"student: tensor_parallel x pipeline_parallel = 2 x 2 = 4 does not divide"
    ):
        ParallelLayout(2, 2).data_parallel(6, "student")
    with pytest.raises(ValueError, match=r"choose TP x PP in \[1, 2, 3, 6\]"):
        ParallelLayout(4, 1).data_parallel(6)
    assert ParallelLayout(2, 1).data_parallel(6) == 3


def test_teacher_and_student_vocabularies_must_match_beyond_padding():
    config = RunConfig(student=tiny(vocab_size=300), teacher=tiny(vocab_size=301))
    with pytest.raises(ValueError, match="student vocab_size 300 != teacher vocab_size 301"):
        config.validate()
    RunConfig(
        student=tiny(vocab_size=300), teacher=tiny(vocab_size=300, make_vocab_size_divisible_by=256)
    ).validate()


def test_world_size_and_batch_split_are_checked_together():
    config = RunConfig(parallel=ParallelConfig(teacher_tensor_parallel=2))
    expected = (
        "parallel.teacher: tensor_parallel x pipeline_parallel = 2 x 1 = 2 does not divide the world size 3"
    )
    with pytest.raises(ValueError, match=expected):
        config.validate(world_size=3)
    uneven = dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, prompts_per_step=3, samples_per_prompt=1)
    )
    with pytest.raises(ValueError, match="do not split over the student's 4 data-parallel ranks"):
        uneven.validate(world_size=4)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by tensor_parallel=4"):
        RunConfig(parallel=ParallelConfig(student_tensor_parallel=4)).validate()


def test_in_training_evaluation_needs_its_benchmarks():
    from megatron_tropd.config import EvalConfig

    with pytest.raises(ValueError, match="eval.interval=5 but eval.benchmarks is empty"):
        EvalConfig(interval=5).validate()
    EvalConfig(interval=5, benchmarks="data/benchmarks").validate()
    EvalConfig(interval=0).validate()
