"""A model on its layout: this rank's stage of it, the process groups of its layout, and its shape.

Everything that runs a model (scoring, generation, evaluation, conversion checks) takes a ``PlacedModel``
rather than a module and its groups separately, so a model's layout can never be paired with another
model's groups. ``place_model`` builds the frozen ones (the teacher, a model under evaluation);
``training.Student.placed`` is the student's, whose forward passes go through its DDP wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_tropd.model_config import ModelConfig
from megatron_tropd.topology import ModelGroups, replica_rows


@dataclass(frozen=True)
class PlacedModel:
    """This rank's ``stage`` of a model of shape ``config`` on the layout of ``groups``."""

    stage: torch.nn.Module
    """The unwrapped Megatron ``GPTModel`` stage (what generation reads its parameters from)."""

    groups: ModelGroups
    config: ModelConfig

    runner: torch.nn.Module | None = None
    """What forward passes go through when it is not the stage itself (the student's DDP wrapper)."""

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.runner if self.runner is not None else self.stage

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    @property
    def tp_group(self):
        return self.groups.tp_group

    @property
    def vocab_size(self) -> int:
        """The true (unpadded) vocabulary."""
        return self.config.vocab_size

    def rows(self, num_rows: int, lengths: Sequence[int] | None = None, uneven: bool = False) -> slice:
        """The rows of a global batch of ``num_rows`` that this rank's data-parallel replica owns: equal
        counts, or, given each row's token count, balanced token counts (``uneven``: any number of rows,
        some replicas possibly without one)."""
        dp, dp_rank = self.groups.data_parallel, self.groups.position.dp_rank
        return replica_rows(num_rows, dp, dp_rank, lengths, uneven)

    def engine(
        self,
        max_sequence_length: int,
        max_batch_size: int,
        decoder: str = "auto",
        batching: str = "continuous",
    ):
        """A KV-cache ``MegatronGenerationEngine`` over this model's replica (``rollout.batching``)."""
        from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

        return MegatronGenerationEngine(self, max_sequence_length, max_batch_size, decoder, batching)


def one_model_groups(tensor_parallel: int, pipeline_parallel: int, seed: int) -> ModelGroups:
    """``runtime.start`` for a job that runs one model (evaluation, conversion, the demo's pre-training):
    its TP x PP layout over every rank, the rest data-parallel. Collective."""
    from megatron_tropd.runtime import start
    from megatron_tropd.topology import ParallelLayout

    return start(ParallelLayout(tensor_parallel, pipeline_parallel), seed=seed).student


def place_model(
    model_config: ModelConfig,
    groups: ModelGroups,
    *,
    weights: str = "",
    seed: int | None = 0,
    params_dtype: torch.dtype | None = None,
) -> PlacedModel:
    """This rank's frozen stage of ``model_config`` on the layout of ``groups``: weights read-only from the
    checkpoint ``weights`` when given, else drawn from ``seed`` (None: left uninitialised, for a caller
    that fills them); no gradients, eval mode. ``params_dtype``: None is bf16 on GPU, fp32 on CPU."""
    from megatron_tropd.checkpoint import load_model_weights
    from megatron_tropd.models import build_gpt_model

    stage = build_gpt_model(
        model_config, groups.pg_collection, pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage, tensor_parallel_size=groups.layout.tensor_parallel,
        pipeline_parallel_size=groups.layout.pipeline_parallel, params_dtype=params_dtype,
        seed=None if weights else seed,
    )  # fmt: skip
    if weights:
        load_model_weights(weights, stage, model_config)
    return PlacedModel(stage.requires_grad_(False).eval(), groups, model_config)
