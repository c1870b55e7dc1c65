"""Run-level validation that must fail before any process group starts."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_tropd.config import ParallelConfig, RolloutConfig, RunConfig
from megatron_tropd.model_config import tiny
from megatron_tropd.topology import ParallelLayout

# Prompt + generation that fit tiny()'s 256 positions (the defaults, 1024 + 8096, are the paper's).
FITS_TINY = RolloutConfig(max_prompt_length=64, max_new_tokens=64)


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
        student=tiny(vocab_size=300),
        teacher=tiny(vocab_size=300, make_vocab_size_divisible_by=256),
        rollout=FITS_TINY,
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
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by parallel.student_tensor"):
        RunConfig(parallel=ParallelConfig(student_tensor_parallel=4)).validate()


@pytest.mark.parametrize(
    ("teacher", "parallel", "expected"),
    [
        (
            tiny(num_query_groups=1),
            ParallelConfig(student_tensor_parallel=2, teacher_tensor_parallel=2),
            "teacher.num_query_groups=1 is not divisible by parallel.teacher_tensor_parallel=2",
        ),
        (
            tiny(num_layers=3),
            ParallelConfig(student_pipeline_parallel=2, teacher_pipeline_parallel=2),
            "teacher.num_layers=3 is not divisible by parallel.teacher_pipeline_parallel=2",
        ),
    ],
    ids=["tensor", "pipeline"],
)
def test_a_teacher_layout_error_names_the_teacher_keys(teacher, parallel, expected):
    """The student splits the same way, so only the teacher can be at fault: the message must say so."""
    with pytest.raises(ValueError) as raised:
        RunConfig(teacher=teacher, parallel=parallel, rollout=FITS_TINY).validate()
    message = str(raised.value)
    assert expected in message and "student" not in message, message
    student_error = RunConfig(student=teacher, parallel=parallel, rollout=FITS_TINY)
    with pytest.raises(ValueError, match=expected.replace("teacher", "student")):
        student_error.validate()


def test_in_training_evaluation_needs_its_benchmarks():
    from megatron_tropd.config import EvalConfig

    with pytest.raises(ValueError, match="eval.interval=5 but eval.benchmarks is empty"):
        EvalConfig(interval=5).validate()
    EvalConfig(interval=5, benchmarks="data/benchmarks").validate()
    EvalConfig(interval=0).validate()


def test_prompt_and_generation_must_fit_both_models_context():
    """rollout.max_prompt_length + rollout.max_new_tokens against each model's max_position_embeddings."""
    with pytest.raises(
        ValueError,
        match=r"rollout.max_prompt_length \+ rollout.max_new_tokens = 1024 \+ 8096 = 9120 positions exceed "
        r"student.max_position_embeddings = 256 .*sum to at most 256",
    ):
        RunConfig().validate()
    short_teacher = RunConfig(teacher=tiny(max_position_embeddings=100), rollout=FITS_TINY)
    with pytest.raises(ValueError, match=r"= 128 positions exceed teacher.max_position_embeddings = 100"):
        short_teacher.validate()
    exact = dataclasses.replace(FITS_TINY, max_prompt_length=100, max_new_tokens=156)
    RunConfig(rollout=exact).validate()  # exactly the context: fits
    with pytest.raises(ValueError, match="= 257 positions exceed student"):
        RunConfig(rollout=dataclasses.replace(exact, max_new_tokens=157)).validate()


def test_in_loop_evaluation_budget_must_leave_room_for_a_prompt():
    from megatron_tropd.config import EvalConfig

    evaluation = EvalConfig(interval=2, benchmarks="data/benchmarks", max_new_tokens=256)
    with pytest.raises(ValueError, match=r"eval.max_new_tokens = 256 leaves no position for a prompt .* 256"):
        RunConfig(rollout=FITS_TINY, eval=evaluation).validate()
    RunConfig(rollout=FITS_TINY, eval=dataclasses.replace(evaluation, max_new_tokens=255)).validate()
    RunConfig(rollout=FITS_TINY, eval=dataclasses.replace(evaluation, interval=0)).validate()  # unused


def test_chat_template_kwargs_are_validated():
    from megatron_tropd.config import DataConfig

    DataConfig(chat_template_kwargs={"enable_thinking": False, "date_string": "01 Jan 2025"}).validate()
    with pytest.raises(ValueError, match="'add_generation_prompt' is set by the renderer itself"):
        DataConfig(chat_template_kwargs={"add_generation_prompt": False}).validate()
    with pytest.raises(ValueError, match="key 'not a name' is not a template variable name"):
        DataConfig(chat_template_kwargs={"not a name": 1}).validate()
    with pytest.raises(ValueError, match="must hold JSON values"):
        DataConfig(chat_template_kwargs={"when": object()}).validate()
