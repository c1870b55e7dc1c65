"""One call to run microbatches through a Megatron model on its own layout (any TP x PP).

Both models go through Megatron-Core's schedules (``get_forward_backward_func``), with the process groups
of *their* layout passed explicitly, so a teacher on TP=4 and a student on TP=2 x PP=2 can share a job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from megatron_tropd.placed import PlacedModel


def run_microbatches(
    placed: PlacedModel,
    forward_step: Callable,
    microbatches: Sequence[Any],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    collect_non_loss_data: bool = False,
) -> list:
    """Run ``forward_step`` over ``microbatches`` with the 1F1B schedule of ``placed``'s pipeline.

    ``forward_step(data_iterator, model) -> (output, loss_func)`` is Megatron's contract. Returns the
    schedule's per-microbatch ``loss_func`` results on the last pipeline stage, ``[]`` elsewhere. Every
    rank of the pipeline must pass the same number of microbatches of the same shape (non-first stages
    only read ``tokens`` shapes; they receive activations from the previous stage).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    model, groups = placed.forward_module, placed.groups
    pipeline_size = groups.layout.pipeline_parallel
    schedule = get_forward_backward_func(pp_size=pipeline_size)
    kwargs = dict(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        pg_collection=groups.pg_collection,
    )
    if pipeline_size > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp_group, config=get_model_config(model))
    return schedule(**kwargs)
