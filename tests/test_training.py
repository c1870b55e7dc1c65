"""The student's training step and teacher scoring on Megatron-Core, on 4 gloo ranks.

TP/PP invariance: the same tiny student trained 3 steps on the same rollouts at TP1PP1 (DP4), TP2PP1
(DP2), TP1PP2 (DP2) and TP2PP2 (DP1) gives the same losses (atol 2e-5), grad norms (rtol 1e-4) and
parameters (fp32). Differences come only from the order of floating-point reductions, but Adam divides
each gradient element by its own running RMS, so a rounding difference in a near-zero element can move
that element's update by up to the learning rate: parameters are compared at atol = 0.1 x lr.

Each run pairs the student with a teacher on another layout, so the same runs show that the teacher's
signals do not depend on either layout, and that the teacher never changes and holds no gradient or
optimizer state.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tropd.config import MethodConfig, OptimConfig
from megatron_tropd.spawn import run_on_ranks
from megatron_tropd.topology import data_parallel_rows
from tests.distill_setup import (
    NUM_SEQUENCES,
    distill_steps,
    rollout_batch,
    scoring_spec,
    setup_models,
    student_config,
)

STEPS = 3
LR = 1e-4
VOCAB_SIZE = student_config().vocab_size
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
METHOD = MethodConfig(name="tropd", topk=8)
RUNS = {  # student (TP, PP) -> teacher (TP, PP)
    (1, 1): (2, 1),
    (2, 1): (1, 2),
    (1, 2): (2, 2),
    (2, 2): (1, 1),
}
SIGNALS = ("lp_teacher", "topk_ids", "topk_logprobs", "lp_student_old", "entropy_student_old", "trust_mask")


def _shards(module):
    from megatron_tropd.models import sharded_parameters

    return [
        (p.key, tuple(p.global_offset), tuple(p.global_shape), p.data.clone())
        for p in sharded_parameters(module)
    ]


def _assemble(per_rank_shards):
    full = {}
    for shards in per_rank_shards:
        for key, offset, shape, data in shards:
            tensor = full.setdefault(key, torch.full(shape, float("nan")))
            window = tuple(
                slice(o, o + n) for o, n in zip(offset[len(offset) - data.dim() :], data.shape, strict=True)
            )
            prefix = offset[: len(offset) - data.dim()]
            tensor[prefix][window] = data
    return full


def distill_worker(rank, world_size, student_layout, teacher_layout):
    from megatron_tropd.scoring import score_batch

    optim = OptimConfig(lr=LR, micro_batch_size=1, use_distributed_optimizer=True)
    topology, student, teacher = setup_models(student_layout, teacher_layout, optim, STEPS)
    teacher_before = [p.detach().clone() for p in teacher.stage.parameters()]
    scored = score_batch(rollout_batch(0), student.placed, teacher, scoring_spec(METHOD), 0)
    history = distill_steps(topology, student, teacher, METHOD, STEPS)
    groups = topology.student
    rows = data_parallel_rows(NUM_SEQUENCES, groups.data_parallel, groups.position.dp_rank)
    signals = {name: getattr(scored, name) for name in SIGNALS} if groups.is_last_stage else None
    teacher_params = list(teacher.stage.parameters())
    return {
        "history": history if groups.is_last_stage else None,
        "rows": (rows.start, rows.stop),
        "signals": signals,
        "shards": _shards(student.module),
        "teacher_unchanged": all(
            torch.equal(a, b) for a, b in zip(teacher_before, teacher_params, strict=True)
        ),
        "teacher_grads": [p.grad for p in teacher_params if p.grad is not None],
        "teacher_trainable": any(p.requires_grad for p in teacher_params),
        "optimizer_params": sum(len(g["params"]) for g in student.optimizer.param_groups),
    }


@pytest.fixture(scope="module")
def runs():
    return {layout: run_on_ranks(distill_worker, 4, layout, teacher) for layout, teacher in RUNS.items()}


def _global_signals(per_rank):
    merged = {}
    for result in per_rank:
        if result["signals"] is None:
            continue
        start, stop = result["rows"]
        for name, value in result["signals"].items():
            merged.setdefault(name, {})[(start, stop)] = value
    return {name: torch.cat([parts[key] for key in sorted(parts)]) for name, parts in merged.items()}


def _last_stage_history(per_rank):
    histories = [r["history"] for r in per_rank if r["history"] is not None]
    for other in histories[1:]:  # every DP/TP rank of the last stage reports the same reduced metrics
        assert other == histories[0]
    return histories[0]


def test_losses_grad_norms_and_parameters_do_not_depend_on_tp_pp(runs):
    baseline = _last_stage_history(runs[(1, 1)])
    baseline_params = _assemble(r["shards"] for r in runs[(1, 1)])
    assert all(not torch.isnan(t).any() for t in baseline_params.values())
    for layout, per_rank in runs.items():
        history = _last_stage_history(per_rank)
        for step, (got, want) in enumerate(zip(history, baseline, strict=True)):
            for name in ("loss", "term/pg", "term/outlier_fkl", "term/guidance", "trust_fraction"):
                assert got["metrics"][name] == pytest.approx(want["metrics"][name], abs=2e-5), (
                    layout,
                    step,
                    name,
                )
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (layout, step)
        params = _assemble(r["shards"] for r in per_rank)
        assert params.keys() == baseline_params.keys()
        for key, value in params.items():
            want = baseline_params[key]
            if key in VOCAB_KEYS:  # the padded vocabulary grows with TP; compare the true rows
                value, want = value[:VOCAB_SIZE], want[:VOCAB_SIZE]
            difference = (value - want).abs().max().item()
            assert difference <= 0.1 * LR, f"{layout} {key}: max |difference| {difference:.3e}"


def test_training_changes_the_student(runs):
    history = _last_stage_history(runs[(1, 1)])
    losses = [h["metrics"]["loss"] for h in history]
    assert len(set(losses)) == STEPS and all(h["grad_norm"] > 0 for h in history)


def test_teacher_signals_do_not_depend_on_either_layout(runs):
    baseline = _global_signals(runs[(1, 1)])
    assert baseline["lp_teacher"].shape == (NUM_SEQUENCES, rollout_batch(0).seq_length)
    for layout, per_rank in runs.items():
        signals = _global_signals(per_rank)
        assert torch.equal(signals["topk_ids"], baseline["topk_ids"]), layout
        assert torch.equal(signals["trust_mask"], baseline["trust_mask"]), layout
        for name in ("lp_teacher", "topk_logprobs", "lp_student_old", "entropy_student_old"):
            torch.testing.assert_close(
                signals[name], baseline[name], atol=1e-5, rtol=0, msg=f"{layout} {name}"
            )


def test_teacher_is_frozen_and_has_no_optimizer_state(runs):
    for per_rank in runs.values():
        for result in per_rank:
            assert result["teacher_unchanged"]
            assert result["teacher_grads"] == []
            assert not result["teacher_trainable"]
            assert result["optimizer_params"] > 0
