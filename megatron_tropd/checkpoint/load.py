"""Loading: resuming the student (``load_checkpoint``) and reading weights into any layout
(``load_model_weights``, ``read_weights_config``).

Everything that can refuse a checkpoint (the marker, the metadata, the file manifest, the model shape,
the optimizer kind and format) is checked before any tensor is read. Both loaders are collective over the
default process group.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tropd.checkpoint.background import finalize_pending_save
from megatron_tropd.checkpoint.collective import is_rank0, on_rank0
from megatron_tropd.checkpoint.errors import CheckpointError
from megatron_tropd.checkpoint.layout import (
    LATEST,
    latest_name,
    missing_files,
    move_aside,
    resolve_latest,
    step_dirs,
    step_of,
)
from megatron_tropd.checkpoint.manifest import damage, damage_summary
from megatron_tropd.checkpoint.metadata import check_model_config, read_metadata
from megatron_tropd.checkpoint.optimizer import (
    check_optimizer_can_resume,
    load_optimizer_state,
    model_metadata,
    student_state_dict,
    unwrap,
)
from megatron_tropd.checkpoint.rng import load_rng_state
from megatron_tropd.config import ON_DAMAGED, OPTIMIZER_FORMATS  # ON_DAMAGED: see load_checkpoint
from megatron_tropd.models import ModelConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Choosing the directory to resume from
# ---------------------------------------------------------------------------------------------------------


def _train_metadata_of(directory: Path) -> dict[str, Any]:
    metadata = read_metadata(directory)
    if metadata.get("kind") != "train":
        raise CheckpointError(
            f"{directory} holds model weights only, not a training state: resume from a directory written "
            "by save_checkpoint, or load these weights with load_model_weights"
        )
    return metadata


def _resume_candidates(root: Path, on_damaged: str) -> list[tuple[Path, dict | None, str | None]] | None:
    """Rank 0: the directories a resume may start from, newest first, each with its metadata or the reason
    it cannot be read; None for a fresh start. With ``on_damaged="fail"`` only the one ``latest`` names;
    otherwise the first is that one only when ``latest`` names a complete directory."""
    try:
        latest = resolve_latest(root)
    except CheckpointError as exc:
        if on_damaged == "fail":
            raise
        logger.warning("%s; looking for the newest intact checkpoint (checkpoint.on_damaged=previous)", exc)
        latest, newest = None, None
    else:
        if latest is None:
            return None
        newest = step_of(latest)
    directories = [latest] if latest is not None else []
    if on_damaged == "previous":
        earlier = [
            p for step, p in sorted(step_dirs(root).items(), reverse=True) if newest is None or step < newest
        ]
        directories += [p for p in earlier if not missing_files(p)]
    candidates = []
    for directory in directories:
        try:
            candidates.append((directory, _train_metadata_of(directory), None))
        except CheckpointError as exc:
            if on_damaged == "fail":
                raise
            candidates.append((directory, None, str(exc)))
    return candidates


def _find_intact(root: Path, on_damaged: str) -> tuple[Path, dict[str, Any]] | None:
    """Collective: the newest checkpoint to resume from whose files match their manifest, or None for a
    fresh start. A damaged one raises (``fail``) or is skipped with a warning (``previous``)."""
    if on_damaged not in ON_DAMAGED:
        raise CheckpointError(f"on_damaged must be one of {ON_DAMAGED}; got {on_damaged!r}")
    candidates = on_rank0(_resume_candidates, root, on_damaged)
    if candidates is None:
        return None
    named_by_latest = on_rank0(latest_name, root)
    damaged: list[Path] = []
    for directory, metadata, unreadable in candidates:
        problems = [unreadable] if unreadable else damage(directory, metadata)
        if not problems:
            if damaged or directory.name != named_by_latest:
                on_rank0(move_aside, root, damaged, directory)
            return directory, metadata
        if on_damaged == "fail":
            raise CheckpointError(
                f"checkpoint {directory} (step {metadata['step']}) is damaged: {damage_summary(problems)}. "
                "Restore those files, or set checkpoint.on_damaged=previous to resume from the newest intact "
                "earlier step"
            )
        if is_rank0():
            logger.warning(
                "checkpoint %s is damaged (%s); trying an earlier step", directory, damage_summary(problems)
            )
        damaged.append(directory)
    raise CheckpointError(
        f"no intact checkpoint in {root}: damaged {[p.name for p in damaged]}. Restore the damaged files, or "
        "start from scratch in another checkpoint.save_dir"
    )


# ---------------------------------------------------------------------------------------------------------
# Resuming the student
# ---------------------------------------------------------------------------------------------------------


def _load_scheduler(scheduler: Any, saved: dict[str, Any], directory: Path) -> None:
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as exc:  # megatron asserts that the configured schedule equals the saved one
        raise CheckpointError(
            f"{directory}: the learning-rate schedule differs from the student's ({exc}): resume with the "
            "optim settings (lr, min_lr, warmup_steps, total steps) the run was saved with"
        ) from None


def load_checkpoint(root: str | os.PathLike, student: Any, on_damaged: str = "fail") -> dict[str, Any] | None:
    """Resume ``student`` from ``root/latest``; returns the saved loop state, or None without a checkpoint.

    Collective. The student may run on any TP/PP/DP layout (a ``dp_reshardable`` optimizer state needs
    the saved TP/PP). Restores weights, optimizer state, LR schedule and -- when the world size is the
    saved one -- every rank's RNG state. A checkpoint of another model shape, optimizer kind or an
    incomplete directory is refused (``CheckpointError``) before anything is loaded. Call it on a freshly
    built student (the scheduler counts the restored steps from its own start). The loop state comes back
    as JSON returns it (tuples become lists).

    Every file is checked against the manifest recorded at save (size, then hash) before anything is read:
    a damaged checkpoint raises ``CheckpointError`` naming the files and the step, or, with
    ``on_damaged="previous"``, the newest intact earlier step is resumed instead (``ON_DAMAGED``).
    A pending background save is finalized (published) first.
    """
    finalize_pending_save()
    found = _find_intact(Path(root), on_damaged)
    if found is None:
        return None
    directory, metadata = found
    check_model_config(metadata["model_config"], student.model_config, directory)
    check_optimizer_can_resume(metadata, student, directory)

    from megatron.core import dist_checkpointing

    optimizer_format = metadata["optimizer"]["format"]
    sharding_type = optimizer_format if optimizer_format in OPTIMIZER_FORMATS else None
    state = student_state_dict(student, sharding_type, is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    student.module.load_state_dict(loaded["model"])
    load_optimizer_state(student.optimizer, loaded["optimizer"])
    _load_scheduler(student.scheduler, metadata["scheduler"], directory)
    load_rng_state(directory, metadata["layout"]["world_size"])
    logger.info("resumed from %s (step %d)", directory, metadata["step"])
    return metadata["loop_state"]


# ---------------------------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------------------------


def _find_weights(path: Path) -> tuple[Path, dict[str, Any]]:
    """Rank 0: the checkpoint directory at ``path`` (or named by ``path/latest``) and its metadata."""
    if not path.exists():
        raise CheckpointError(
            f"model checkpoint {path} does not exist: pass a directory written by save_model_weights or "
            "save_checkpoint (or a run root with a 'latest' marker)"
        )
    directory = resolve_latest(path) if (path / LATEST).is_file() else path
    missing = missing_files(directory)
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (no {', '.join(missing)}): pass a directory written "
            "by save_model_weights or save_checkpoint"
        )
    return directory, read_metadata(directory)


def read_weights_config(path: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """The weights directory at ``path`` (or named by its ``latest``) and the ``ModelConfig`` it was saved
    with. Local, not collective; raises ``CheckpointError`` naming the path and what was expected."""
    try:
        directory, metadata = _find_weights(Path(path))
        return directory, ModelConfig.from_dict(metadata["model_config"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read the model checkpoint {path} ({type(exc).__name__}: {exc}); expected a directory "
            "written by save_model_weights or save_checkpoint, or a run root with a 'latest' marker"
        ) from None


def _shape_problems(model_state: dict[str, Any], directory: Path) -> list[str]:
    """This rank's tensors that the checkpoint lacks or holds in another global shape (vocab padding,
    which depends on TP, excepted)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    problems = []
    for tensor in nested_values(model_state):
        if not isinstance(tensor, ShardedTensor):
            continue
        if tensor.key not in saved:
            problems.append(f"{tensor.key} is missing")
        elif not tensor.allow_shape_mismatch and tuple(saved[tensor.key].global_shape) != tensor.global_shape:
            problems.append(
                f"{tensor.key} has shape {tuple(saved[tensor.key].global_shape)}, model {tensor.global_shape}"
            )
    return problems


def _raise_on_shape_problems(model_state: dict[str, Any], directory: Path) -> None:
    """Collective: every rank raises if any rank's stage does not fit the checkpoint."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _shape_problems(model_state, directory))
    problems = sorted({problem for rank_problems in gathered for problem in rank_problems})
    if problems:
        raise CheckpointError(
            f"{directory} does not hold this model's weights ({'; '.join(problems[:6])}): load a checkpoint "
            "of the same model shape (architecture and sizes) as the model built"
        )


@torch.no_grad()
def load_model_weights(
    path: str | os.PathLike, model: torch.nn.Module, model_config: ModelConfig | None = None
) -> None:
    """Load weights into ``model`` (any TP/PP layout, its own process groups); never writes to ``path``.

    Collective. ``path``: a ``save_model_weights`` directory, a ``save_checkpoint`` step directory, or a
    run root (its ``latest``). With ``model_config`` a checkpoint of another shape is refused naming the
    differing fields; without it, by the tensors' names and shapes. Either check runs before any load.
    A pending background save is finalized (published) first.
    """
    finalize_pending_save()
    directory, metadata = on_rank0(_find_weights, Path(path))
    problems = damage(directory, metadata)
    if problems:
        raise CheckpointError(
            f"model checkpoint {directory} is damaged: {damage_summary(problems)}. Restore those files or "
            "convert the model again (tools/convert.py import)"
        )
    if model_config is not None:
        check_model_config(metadata["model_config"], model_config, directory)
    module = unwrap(model)
    state = {"model": module.sharded_state_dict(metadata=model_metadata(module))}
    _raise_on_shape_problems(state["model"], directory)

    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(state, str(directory))
    module.load_state_dict(loaded["model"])
