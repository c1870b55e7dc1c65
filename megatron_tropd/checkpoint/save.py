"""Saving: the student's training state (``save_checkpoint``) and a model's weights (``save_model_weights``).

Every rank writes into ``tmp-<name>-<nonce>`` (the nonce is drawn on rank 0 and broadcast); our metadata
file, with the manifest of every other file, is written last; then rank 0 publishes the directory
(``layout``). Both functions are collective over the default process group. A save of the student may
instead be written in the background and published later (``background``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tropd.checkpoint.background import finalize_pending_save, start_background_save
from megatron_tropd.checkpoint.collective import on_rank0
from megatron_tropd.checkpoint.errors import CheckpointError
from megatron_tropd.checkpoint.layout import (
    TMP_PREFIX,
    prepare_save,
    publish_step,
    publish_weights,
    step_dir_name,
)
from megatron_tropd.checkpoint.manifest import record_files
from megatron_tropd.checkpoint.metadata import FORMAT_VERSION, config_dict, write_metadata
from megatron_tropd.checkpoint.optimizer import model_metadata, student_state_dict, sub_optimizers, unwrap
from megatron_tropd.checkpoint.rng import save_rng_state
from megatron_tropd.config import OPTIMIZER_FORMATS
from megatron_tropd.models import ModelConfig

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    from importlib import metadata as package_metadata

    try:
        megatron_version = package_metadata.version("megatron-core")
    except package_metadata.PackageNotFoundError:
        megatron_version = "unknown"
    return {"megatron_core": megatron_version, "torch": torch.__version__}


def _new_tmp_dir(final_dir: Path, leftover_prefix: str, may_replace: bool) -> tuple[Path, str]:
    """Collective: a fresh temporary sibling of ``final_dir`` (its nonce drawn on rank 0) and the nonce."""
    nonce = on_rank0(secrets.token_hex, 4)  # one name on every rank
    tmp_dir = final_dir.parent / f"{TMP_PREFIX}{final_dir.name}-{nonce}"
    on_rank0(prepare_save, tmp_dir, final_dir, leftover_prefix, may_replace)
    return tmp_dir, nonce


def _complete_tmp_dir(tmp_dir: Path, metadata: dict) -> None:
    """Collective, once every rank's part is written: the manifest, in our metadata file, written last."""
    dist.barrier()  # every shard and side file is on disk
    metadata = {**metadata, "integrity": record_files(tmp_dir)}
    on_rank0(write_metadata, tmp_dir, metadata)


def _write_in_tmp_dir(
    final_dir: Path, leftover_prefix: str, may_replace: bool, write: Callable[[Path], None], metadata: dict
) -> tuple[Path, str]:
    """Collective: every rank writes its part into a fresh temporary sibling of ``final_dir``.

    Returns the temporary directory, complete (our metadata file is written last, after a barrier), and
    the nonce in its name.
    """
    tmp_dir, nonce = _new_tmp_dir(final_dir, leftover_prefix, may_replace)
    write(tmp_dir)
    _complete_tmp_dir(tmp_dir, metadata)
    return tmp_dir, nonce


def _check_save_arguments(step: int, keep_last: int, optimizer_format: str, loop_state: Any) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be an integer >= 0; got {step!r}")
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise CheckpointError(
            f"keep_last must be an integer >= 1 (the newest checkpoint is kept); got {keep_last!r}"
        )
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise CheckpointError(
            f"optimizer_format must be one of {OPTIMIZER_FORMATS}; got {optimizer_format!r}"
        )
    if not isinstance(loop_state, dict):
        raise CheckpointError(f"loop_state must be a dict; got {type(loop_state).__name__}")
    try:
        json.dumps(loop_state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"loop_state must be JSON-serialisable (numbers, strings, lists, dicts): {exc}; convert tensors "
            "and numpy values with .item() / .tolist()"
        ) from None


def _train_metadata(step: int, student: Any, loop_state: dict, optimizer_format: str) -> dict[str, Any]:
    groups, distributed = student.groups, student.optim_config.use_distributed_optimizer
    return {
        "format_version": FORMAT_VERSION,
        "kind": "train",
        "step": step,
        "loop_state": loop_state,
        "model_config": config_dict(student.model_config),
        "layout": {
            "tensor_parallel": groups.layout.tensor_parallel,
            "pipeline_parallel": groups.layout.pipeline_parallel,
            "data_parallel": groups.data_parallel,
            "world_size": dist.get_world_size(),
        },
        "optimizer": {
            "distributed": distributed,
            "format": optimizer_format if distributed else "model_space",
        },
        "scheduler": student.scheduler.state_dict(),
        "versions": _versions(),
    }


def signal_safe_save_strategy() -> Any:
    """Megatron's default ``torch_dist`` save strategy, its writer's helper process kept out of signals.

    The writer (``dist_checkpointing.strategies.filesystem_async``) collects its results through one
    ``multiprocessing.Manager`` process per rank, started at the first save with default signal handling.
    Slurm signals every process of a step, so the manager died of the very SIGTERM / SIGUSR1 whose
    checkpoint the rank then wrote (``BrokenPipeError``). The manager is started here instead, once per
    process, ignoring the stop signals and Ctrl-C and dying with its rank (``signals``).
    """
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_tropd.signals import ignore_stop_signals_in_helper, stop_signals_held

    if filesystem_async._results_queue is None:  # the writer's own lazily made queue, made our way
        manager = SyncManager(ctx=torch.multiprocessing.get_context("spawn"))
        with stop_signals_held():  # the mask survives the spawn: no signal reaches it before its initializer
            manager.start(initializer=ignore_stop_signals_in_helper)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    return get_default_save_sharded_strategy()


def _local_tensors_finite(student: Any) -> bool:
    """This rank's parameters and optimizer-state tensors (Adam moments) are all finite."""
    tensors = [param.detach() for param in student.model.parameters()]
    for sub_optimizer in sub_optimizers(student.optimizer):
        inner = getattr(sub_optimizer, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            floats = [value for value in state.values() if torch.is_tensor(value)]
            tensors += [value for value in floats if value.is_floating_point()]
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _student_finite_everywhere(student: Any) -> bool:
    """One MIN all-reduce over the default group: every rank agrees whether to publish."""
    flag = torch.tensor([1.0 if _local_tensors_finite(student) else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _save_in_background(
    final_dir: Path, step: int, student: Any, metadata: dict, keep_last: int, optimizer_format: str
) -> None:
    """Collective: stage the state and start writing it into a temporary directory; the write is
    published by ``finalize_pending_save`` (``background``)."""
    from megatron.core import dist_checkpointing

    metadata = json.loads(json.dumps(metadata))  # the loop state and schedule as of now
    tmp_dir, nonce = _new_tmp_dir(final_dir, TMP_PREFIX, True)
    state = student_state_dict(student, optimizer_format, is_loading=False)
    request = dist_checkpointing.save(
        state, str(tmp_dir), sharded_strategy=signal_safe_save_strategy(), async_sharded_save=True
    )
    save_rng_state(tmp_dir)

    def finish() -> None:
        _complete_tmp_dir(tmp_dir, metadata)
        on_rank0(publish_step, tmp_dir, final_dir, nonce, keep_last, step)
        logger.info("saved checkpoint %s (written in the background)", final_dir)

    start_background_save(request, final_dir, finish)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    student: Any,
    loop_state: dict[str, Any],
    keep_last: int = 3,
    *,
    optimizer_format: str = "dp_reshardable",
    async_save: bool = False,
) -> Path | None:
    """Save the student's full training state as ``root/step-XXXXXXX`` and point ``root/latest`` at it.

    Collective over the default process group. ``loop_state`` (step, data position, guidance schedule,
    ...) must be JSON-serialisable; ``load_checkpoint`` returns it. ``optimizer_format`` is the
    DistributedOptimizer's layout on disk: ``dp_reshardable`` (resume on the same TP/PP, any DP) or
    ``fully_reshardable`` (resume on any layout; gathers the optimizer state over DP while saving).
    Keeps the ``keep_last`` newest step directories. Returns the new step directory, or None when a
    parameter or optimizer-state tensor is non-finite on any rank: nothing is written or pruned then.

    A pending background save is finalized first. ``async_save``: return once the state is copied off
    the training buffers; the files are written in the background and the step is published (``latest``
    included) by the next save or load, or by ``finalize_pending_save`` (``background``).
    """
    finalize_pending_save()
    _check_save_arguments(step, keep_last, optimizer_format, loop_state)
    if not _student_finite_everywhere(student):
        logger.error(
            "step %d: the student's parameters or optimizer state hold NaN or inf on some rank; this "
            "checkpoint is not saved and no older checkpoint is removed", step
        )  # fmt: skip
        return None
    final_dir = Path(root) / step_dir_name(step)
    metadata = _train_metadata(step, student, loop_state, optimizer_format)
    if async_save:
        _save_in_background(final_dir, step, student, metadata, keep_last, optimizer_format)
        return final_dir

    def write(directory: Path) -> None:
        from megatron.core import dist_checkpointing

        state = student_state_dict(student, optimizer_format, is_loading=False)
        dist_checkpointing.save(state, str(directory), sharded_strategy=signal_safe_save_strategy())
        save_rng_state(directory)

    tmp_dir, nonce = _write_in_tmp_dir(final_dir, TMP_PREFIX, True, write, metadata)
    on_rank0(publish_step, tmp_dir, final_dir, nonce, keep_last, step)
    logger.info("saved checkpoint %s", final_dir)
    return final_dir


def save_model_weights(path: str | os.PathLike, model: torch.nn.Module, model_config: ModelConfig) -> Path:
    """Save only a model's weights (any layout) as the dist-checkpoint directory ``path``.

    Collective. For teachers and HF conversion: ``load_model_weights`` reads it into any TP/PP layout.
    ``path`` must not exist yet; it appears complete or not at all. A pending background save of the
    student is finalized first.
    """
    finalize_pending_save()
    final_dir = Path(path)
    module = unwrap(model)
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "weights",
        "model_config": config_dict(model_config),
        "layout": {
            "tensor_parallel": module.config.tensor_model_parallel_size,
            "pipeline_parallel": module.config.pipeline_model_parallel_size,
            "world_size": dist.get_world_size(),
        },
        "versions": _versions(),
    }

    def write(directory: Path) -> None:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(
            {"model": module.sharded_state_dict(metadata=model_metadata(module))},
            str(directory),
            sharded_strategy=signal_safe_save_strategy(),
        )

    leftover_prefix = f"{TMP_PREFIX}{final_dir.name}-"
    tmp_dir, _ = _write_in_tmp_dir(final_dir, leftover_prefix, False, write, metadata)
    on_rank0(publish_weights, tmp_dir, final_dir)
    logger.info("saved model weights %s", final_dir)
    return final_dir
