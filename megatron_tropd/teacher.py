"""The frozen teacher: this rank's stage of it, on the teacher's own layout."""

from __future__ import annotations

import torch

from megatron_tropd.topology import ModelGroups


def build_teacher(
    model_config,
    groups: ModelGroups,
    *,
    seed: int,
    checkpoint: str = "",
    params_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """This rank's frozen teacher stage on its own layout: weights read-only from ``checkpoint`` when
    given (else drawn from ``seed``), no gradients, eval mode; the optimizer never sees it.
    ``params_dtype``: None is bf16 on GPU, fp32 on CPU."""
    from megatron_tropd.checkpoint import load_model_weights
    from megatron_tropd.models import build_gpt_model

    teacher = build_gpt_model(
        model_config, groups.pg_collection, pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage, tensor_parallel_size=groups.layout.tensor_parallel,
        pipeline_parallel_size=groups.layout.pipeline_parallel, params_dtype=params_dtype,
        seed=None if checkpoint else seed,
    )  # fmt: skip
    if checkpoint:
        load_model_weights(checkpoint, teacher, model_config)
    return teacher.requires_grad_(False).eval()
