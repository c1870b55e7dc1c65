"""The full-vocabulary methods through scoring and the training step, on 2 gloo ranks.

The teacher's last stage returns its final hidden states with its usual signals, each student rank gets
the teacher's output-layer rows of its vocabulary partition, and ``fkl_full`` / ``tropd_full`` train on
the exact divergences. Two student layouts (TP1 DP2 and TP2 DP1), each with its teachers on another
layout: an untied qwen2 teacher and a tied qwen3 teacher (its output layer is its embedding; at PP2 the
last stage's copy of it). Checked:

- the hidden states and weight rows rebuild the teacher's own scoring-time log-probs (at the label and at
  its top-k ids), so capture, transport and weight distribution line up on every layout; packed (THD)
  scoring captures the same hidden states as padded scoring;
- losses, grad norms and the ``bias/*`` metrics agree across the student layouts;
- the ``bias/*`` metrics are finite, and with the ``tail`` family (the teacher's and the student's
  distributions coarse-grained to the top-k ids plus one bucket) the full FKL is at least the top-k
  FKL, as the data-processing inequality says.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_tropd.config import MethodConfig, OptimConfig
from megatron_tropd.models import tiny
from megatron_tropd.spawn import run_on_ranks
from tests.distill_setup import (
    SEQ_LEN,
    distill_steps,
    rollout_batch,
    scoring_spec,
    setup_models,
    student_config,
)

STEPS = {"fkl_full": 1, "tropd_full": 2}  # optimizer updates per method and teacher
LR = 1e-4
RUNS = {(1, 1): (2, 1), (2, 1): (1, 2)}  # student (TP, PP) -> the teachers' (TP, PP)
TIED_TEACHER = tiny("qwen3", num_layers=2)
METHODS = {
    "fkl_full": MethodConfig(name="fkl_full", topk=8),
    "tropd_full": MethodConfig(name="tropd_full", topk=8, fkl_family="tail"),
}
BIAS = [f"bias/{what}_{where}" for what in ("full_fkl", "topk_fkl", "full_minus_topk") for where in
        ("trusted", "outlier")]  # fmt: skip


@torch.no_grad()
def _rebuilt_teacher_log_probs(scored, student):
    """Max |difference| between the teacher's scoring-time log-probs (label, top-k) and the ones its
    hidden states and this rank's weight rows give."""
    from megatron_tropd import ops

    groups, vocab = student.groups, student_config().vocab_size
    weight = student.teacher_weight
    dummy_logits = torch.zeros(*scored.teacher_hidden.shape[:2], weight.shape[0])
    teacher_lse = ops.vocab_parallel_full_divergence_with_stats(
        dummy_logits, scored.teacher_hidden, weight, groups.tp_group, vocab
    ).teacher_lse
    ids = torch.cat([scored.labels.unsqueeze(-1), scored.topk_ids], -1)
    rebuilt = ops.vocab_parallel_teacher_log_probs_at(
        scored.teacher_hidden, weight, ids, teacher_lse, groups.tp_group, vocab
    )
    wanted = torch.cat([scored.lp_teacher.unsqueeze(-1), scored.topk_logprobs], -1)
    mask = scored.loss_mask
    return (rebuilt[mask] - wanted[mask]).abs().max().item()


def _hidden_by_sample(scored):
    """This rank's scored ``teacher_hidden`` at the loss-bearing positions, by sample id."""
    return {
        int(sample): scored.teacher_hidden[row][scored.loss_mask[row]]
        for row, sample in enumerate(scored.sample_ids)
    }


def full_vocab_worker(rank, world_size, student_layout, teacher_layout):
    from megatron_tropd.placed import place_model
    from megatron_tropd.scoring import score_batch
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import attach_teacher_weight

    optim = OptimConfig(lr=LR, micro_batch_size=1)
    topology, student, untied = setup_models(student_layout, teacher_layout, optim, max(STEPS.values()))
    tied = place_model(TIED_TEACHER, topology.groups_for(ParallelLayout(*teacher_layout)), seed=33)
    out = {}
    for teacher_name, teacher in (("untied", untied), ("tied", tied)):
        attach_teacher_weight(student, teacher)
        method = METHODS["tropd_full"]
        spec = scoring_spec(method, teacher.config.hidden_size)
        scored = score_batch(rollout_batch(0), student.placed, teacher, spec, 0)
        packed_spec = dataclasses.replace(spec, max_tokens=2 * SEQ_LEN)  # THD microbatches of whole rows
        packed = score_batch(rollout_batch(0), student.placed, teacher, packed_spec, 0)
        if topology.student.is_last_stage:
            out[(teacher_name, "rebuilt")] = _rebuilt_teacher_log_probs(scored, student)
            out[(teacher_name, "padded_hidden")] = _hidden_by_sample(scored)
            out[(teacher_name, "packed_hidden")] = _hidden_by_sample(packed)
        for name, method in METHODS.items():
            history = distill_steps(topology, student, teacher, method, STEPS[name])
            out[(teacher_name, name)] = history if topology.student.is_last_stage else None
    return out


@pytest.fixture(scope="module")
def runs():
    return {layout: run_on_ranks(full_vocab_worker, 2, layout, teacher) for layout, teacher in RUNS.items()}


def _reported(per_rank, key):
    values = [result[key] for result in per_rank if result.get(key) is not None]
    for other in values[1:]:  # every last-stage rank reports the same reduced metrics
        assert other == values[0], key
    return values[0]


@pytest.mark.slow
def test_hidden_states_and_weight_rows_rebuild_the_teachers_log_probs(runs):
    for layout, per_rank in runs.items():
        for teacher in ("untied", "tied"):
            for result in per_rank:
                if (teacher, "rebuilt") in result:
                    assert result[(teacher, "rebuilt")] < 2e-5, (layout, teacher)


@pytest.mark.slow
def test_packed_scoring_captures_the_same_hidden_states(runs):
    """THD-packed teacher passes (the pre-hook then sees ``[T, 1, h]``) give each row's padded states."""
    for layout, per_rank in runs.items():
        for teacher in ("untied", "tied"):
            padded, packed = {}, {}
            for result in per_rank:
                padded.update(result.get((teacher, "padded_hidden"), {}))
                packed.update(result.get((teacher, "packed_hidden"), {}))
            assert sorted(padded) == sorted(packed) == list(range(len(padded))) and padded
            for sample, states in padded.items():
                assert states.abs().sum() > 0
                torch.testing.assert_close(packed[sample], states, atol=1e-5, rtol=0, msg=(layout, sample))


@pytest.mark.slow
def test_full_vocab_losses_and_grad_norms_do_not_depend_on_the_layout(runs):
    baseline = runs[(1, 1)]
    for layout, per_rank in runs.items():
        for teacher in ("untied", "tied"):
            for name in METHODS:
                got, want = _reported(per_rank, (teacher, name)), _reported(baseline, (teacher, name))
                for step, (g, w) in enumerate(zip(got, want, strict=True)):
                    what = (layout, teacher, name, step)
                    for metric in ("loss", *BIAS):
                        assert g["metrics"][metric] == pytest.approx(w["metrics"][metric], abs=2e-5), what
                    assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), what
                    assert g["grad_norm"] > 0, what


@pytest.mark.slow
def test_bias_metrics_are_finite_and_the_full_fkl_bounds_the_coarse_grained_one(runs):
    for teacher in ("untied", "tied"):
        for name in METHODS:
            for record in _reported(runs[(1, 1)], (teacher, name)):
                metrics = record["metrics"]
                assert all(math.isfinite(metrics[m]) for m in BIAS), (teacher, name)
                for where in ("trusted", "outlier"):
                    assert metrics[f"bias/full_fkl_{where}"] >= 0
                    difference = metrics[f"bias/full_minus_topk_{where}"]
                    gap = metrics[f"bias/full_fkl_{where}"] - metrics[f"bias/topk_fkl_{where}"]
                    assert difference == pytest.approx(gap, abs=1e-6)
                    if METHODS[name].fkl_family == "tail":
                        assert difference >= -1e-5, (teacher, name, where)
        # tropd_full's outlier term is the full FKL itself: its token mean is the loss term's numerator
        record = _reported(runs[(1, 1)], (teacher, "tropd_full"))[0]["metrics"]
        assert record["term/outlier_full_fkl"] > 0
