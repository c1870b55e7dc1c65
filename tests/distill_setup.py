"""Shared set-up of the multi-process training tests: tiny teacher and student, a synthetic rollout batch."""

from __future__ import annotations

import torch

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import MethodConfig, OptimConfig
from megatron_tropd.models import tiny
from megatron_tropd.placed import place_model
from megatron_tropd.runtime import enable_cpu_mode
from megatron_tropd.scoring import ScoringSpec, score_batch
from megatron_tropd.topology import ParallelLayout, build_topology
from megatron_tropd.training import batch_context, build_student, train_step

NUM_SEQUENCES, SEQ_LEN = 8, 16
STUDENT_SEED, TEACHER_SEED = 11, 22


def student_config():
    return tiny("qwen2")


def teacher_config():
    return tiny("qwen2", num_layers=2, hidden_size=96, num_attention_heads=6, num_query_groups=2)


def rollout_batch(step: int) -> RolloutBatch:
    """Deterministic right-padded sequences: prompt, response (some with a teacher prefix), padding."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(1, student_config().vocab_size, (NUM_SEQUENCES, SEQ_LEN), generator=generator)
    loss_mask = torch.zeros(NUM_SEQUENCES, SEQ_LEN, dtype=torch.bool)
    prefix = torch.zeros_like(loss_mask)
    for row in range(NUM_SEQUENCES):
        prompt = 3 + row % 4
        end = SEQ_LEN - row % 3  # some sequences end early (padding after)
        loss_mask[row, prompt - 1 : end - 1] = True  # labels t+1 in [prompt, end)
        if row % 2:
            prefix[row, prompt - 1 : prompt + 2] = True  # the first 3 response tokens came from the teacher
        tokens[row, end:] = 0
    return RolloutBatch(tokens, loss_mask, prefix, torch.arange(NUM_SEQUENCES) + 100 * step)


def setup_models(student_layout, teacher_layout, optim: OptimConfig, total_steps: int):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    enable_cpu_mode()
    topology = build_topology(ParallelLayout(*student_layout), ParallelLayout(*teacher_layout))
    model_parallel_cuda_manual_seed(1234)
    student = build_student(student_config(), optim, topology.student, total_steps, STUDENT_SEED)
    teacher = place_model(teacher_config(), topology.teacher, seed=TEACHER_SEED)
    return topology, student, teacher


def scoring_spec(method: MethodConfig, teacher_hidden_size: int = 0) -> ScoringSpec:
    """``teacher_hidden_size``: the teacher's hidden size, scored with the hidden payload only."""
    return ScoringSpec.for_method(
        student_config().vocab_size, method, micro_batch_size=2, teacher_hidden_size=teacher_hidden_size
    )


def distill_steps(topology, student, teacher, method: MethodConfig, steps: int, first_step: int = 0):
    """Score and train ``steps`` rollout batches; per step the reduced metrics (last stage) and grad norm."""
    history = []
    for step in range(first_step, first_step + steps):
        spec = scoring_spec(method, teacher.config.hidden_size)
        scored = score_batch(rollout_batch(step), student.placed, teacher, spec, step)
        context = batch_context(method, scored, step, first_step + steps, topology.student)
        result = train_step(student, scored, method, context)
        history.append({"metrics": result.metrics, "grad_norm": result.grad_norm, "lr": result.learning_rate})
    return history
