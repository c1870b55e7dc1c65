"""Checkpoints of the student (resumable training state) and of model weights (teachers, conversion).

On disk, a run's checkpoint root holds one directory per saved step and a marker naming the newest::

    root/
      latest                    "step-0000200": the checkpoint a resume starts from
      step-0000100/  step-0000200/
      tmp-step-0000300-3fa9c2e1/   a save in progress (or one that crashed; removed by the next save)

Each step directory is a Megatron dist-checkpoint (``torch_dist`` backend: ``metadata.json``,
``common.pt``, ``*.distcp``) of ``{"model": GPTModel stage, "optimizer": MegatronOptimizer}`` plus:

- ``tropd_checkpoint.json`` (rank 0): step, the caller's loop state (JSON), the LR scheduler's state, the
  student's ``ModelConfig`` (a resume into another shape is refused before anything is read), the layout
  it was saved from and the optimizer format. Written last, it marks the directory complete.
- ``rng/rank-00000.pt`` (every rank): its python / numpy / torch CPU (and CUDA) generator states and
  Megatron's RNG-tracker states. Per-rank side files rather than a ``ShardedObject``: RNG streams belong
  to processes, not to tensor shards, so they are restored only when the world size is unchanged (with
  another world size there is no meaningful mapping; the freshly seeded streams are kept, with a warning).

Atomicity: every rank writes into ``tmp-step-XXXXXXX-<nonce>`` (the nonce is drawn on rank 0 and
broadcast), then rank 0 renames it to ``step-XXXXXXX`` and only then replaces ``latest`` (temp file +
``os.replace``), then prunes old steps. A crash at any point leaves ``latest`` naming a complete
directory; the next save deletes leftover ``tmp-*`` entries. One job per root: saves are not safe against
a second job writing into the same root.

Resharding: weights always reshard over TP/PP/DP (dist-checkpointing; the vocabulary padding, which grows
with TP, is absorbed by Megatron's ``allow_shape_mismatch`` on the embedding and LM head). The
DistributedOptimizer is saved in one of two Megatron formats: ``dp_reshardable`` (default; every rank
writes its own buffer shards, no gather) reshards over DP only, so a resume must keep TP and PP;
``fully_reshardable`` (gathers each parameter's state over DP at save time) resumes on any TP/PP/DP. The
non-distributed optimizer is always model-space and reshards freely.

Megatron-Core quirks handled here (``docs/research/feasibility.md`` section 3), for torch's Adam -- the
optimizer Megatron falls back to without TE/apex (CPU, and GPUs without those packages):
1. ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` asserts one Adam ``step`` over all
   parameters, which fails while the Adam state is still empty: we fill it with zeros first.
2. The per-parameter ``step`` is not restored (``dp_reshardable`` brings back 0, so bias correction would
   restart): we set it from the checkpoint's ``param_groups`` step.
3. The ``fully_reshardable`` loader copies every key of the live Adam state from the checkpoint and fails
   with ``KeyError: 'step'``: we hide ``step`` while it runs, then set it as in (2).
With TE's or apex's fused Adam (GPU containers) ``step`` lives in the param groups, and none is applied.

Every function that saves is collective over the default process group. Megatron's asynchronous writer
starts worker processes with the ``spawn`` method, so a script that saves must keep its entry point under
``if __name__ == "__main__":`` (torchrun scripts and ``megatron_tropd.spawn`` workers do).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tropd import integrity
from megatron_tropd.config import ON_DAMAGED  # fail | previous: see load_checkpoint
from megatron_tropd.models import ModelConfig
from megatron_tropd.platform import default_device

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_METADATA",
    "LATEST",
    "OPTIMIZER_FORMATS",
    "ON_DAMAGED",
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "save_model_weights",
    "step_dir_name",
]

FORMAT_VERSION = 1
CHECKPOINT_METADATA = "tropd_checkpoint.json"
"""Our metadata file inside a checkpoint directory; its presence marks the directory complete."""
MEGATRON_METADATA = "metadata.json"
"""Written by dist-checkpointing once all shards are saved."""
LATEST = "latest"
RNG_DIR = "rng"
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
"""DistributedOptimizer checkpoint formats: DP-only resharding (fast, default) or any layout."""


_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = "tmp-"
_DAMAGED_PREFIX = "damaged-"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    """``step-0000042``: zero-padded so that names sort by step."""
    return f"step-{step:07d}"


# ---------------------------------------------------------------------------------------------------------
# Rank-0 decisions shared with every rank
# ---------------------------------------------------------------------------------------------------------


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def _on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on rank 0 and hand its result (or its failure) to every rank.

    File-system decisions (which directory ``latest`` names, renames, pruning) are taken once, so that
    ranks can never disagree, and an error on rank 0 is raised on every rank instead of leaving the
    others waiting in the next collective.
    """
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if _is_rank0():
        try:
            outcome[0] = ("ok", fn(*args))
        except Exception as exc:  # re-raised below, after the other ranks have been told
            error = exc
            outcome[0] = ("error", isinstance(exc, CheckpointError), f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0][0] == "error":
        _, is_checkpoint_error, message = outcome[0]
        raise (CheckpointError if is_checkpoint_error else RuntimeError)(f"on rank 0: {message}")
    return outcome[0][1]


def _on_every_rank(fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run ``fn`` on every rank and gather the results (rank order) on every rank; a failure on any rank
    is raised on all of them, so none is left waiting in the next collective."""
    try:
        outcome: tuple = ("ok", fn(*args))
    except Exception as exc:  # re-raised below, after every rank has reported
        outcome = ("error", f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome)
    errors = [message for status, message in gathered if status == "error"]
    if errors:
        raise CheckpointError("; ".join(errors))
    return [value for _, value in gathered]


# ---------------------------------------------------------------------------------------------------------
# Integrity: every file's size and hash, recorded at save and checked at load (``integrity``)
# ---------------------------------------------------------------------------------------------------------


def _record_files(directory: Path) -> dict[str, Any]:
    """Collective: the manifest of every file in ``directory`` but our metadata, hashed by all ranks."""
    names = _on_rank0(integrity.list_files, directory, (CHECKPOINT_METADATA,))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    parts = _on_every_rank(integrity.hash_files, directory, integrity.share(names, rank, world_size))
    files = {name: entry for part in parts for name, entry in part.items()}
    return {"hash": integrity.HASH_NAME, "files": dict(sorted(files.items()))}


def _damage(directory: Path, metadata: dict[str, Any]) -> list[str]:
    """Collective: what is wrong with the files of ``directory`` against its manifest (empty: intact).

    A checkpoint written without a manifest is loaded unverified, with a warning.
    """
    record = metadata.get("integrity")
    if record is None:
        if _is_rank0():
            logger.warning(
                "%s has no file manifest (saved by an older release): loading it unverified", directory
            )
        return []
    manifest = record["files"]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = integrity.share(sorted(manifest), rank, world_size)
    parts = _on_every_rank(integrity.check_files, directory, manifest, mine)
    return sorted(problem for part in parts for problem in part)


def _damage_summary(problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> dict[int, Path]:
    """Step directories in ``root`` (complete or not), by step."""
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def _missing_files(directory: Path) -> list[str]:
    return [name for name in (MEGATRON_METADATA, CHECKPOINT_METADATA) if not (directory / name).is_file()]


def _complete_step_names(root: Path) -> list[str]:
    return [p.name for _, p in sorted(_step_dirs(root).items()) if not _missing_files(p)]


def _resolve_latest(root: Path) -> Path | None:
    """The directory ``root/latest`` names, checked complete; None when there is no marker."""
    marker = root / LATEST
    if not marker.is_file():
        complete = _complete_step_names(root)
        if complete:  # starting afresh here would let pruning delete them: make the user choose
            raise CheckpointError(
                f"{root} holds complete checkpoints {complete} but no '{LATEST}' marker (deleted, or a crash "
                f"during the first save): write the step directory to resume from into {marker}, or use "
                "another directory to start from scratch"
            )
        return None
    name = _latest_name(root)
    if len(name) > 80:
        name = name[:80] + "..."
    fix = (
        f"write the name of a complete step directory into {marker} (complete: "
        f"{_complete_step_names(root) or 'none'}), or delete {marker} to start from scratch"
    )
    if name.startswith(_TMP_PREFIX):
        raise CheckpointError(
            f"{marker} names {name!r}, the temporary directory of an unfinished save: {fix}"
        )
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{marker} holds {name!r}, which is not a step directory name: {fix}")
    directory = root / name
    if not directory.is_dir():
        raise CheckpointError(f"{marker} names {name!r} but {directory} does not exist: {fix}")
    missing = _missing_files(directory)
    if missing:
        raise CheckpointError(
            f"{directory} (named by {marker}) is incomplete: no {', '.join(missing)}: {fix}"
        )
    return directory


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete step directory ``root/latest`` names; None when ``root`` holds no checkpoint.

    Raises ``CheckpointError`` when the marker names something that is not a complete checkpoint (a
    temporary directory, a missing directory, one without metadata), or is missing while complete step
    directories exist; the message lists the complete ones. Local, not collective.
    """
    return _resolve_latest(Path(root))


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / CHECKPOINT_METADATA
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged (truncated or overwritten: {type(exc).__name__}: {exc}); restore it, or "
            "resume from an earlier step"
        ) from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is damaged: it holds a {type(metadata).__name__}, not a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format version {version}; this code reads version "
            f"{FORMAT_VERSION}: use the megatron_tropd release that wrote it"
        )
    return metadata


# ---------------------------------------------------------------------------------------------------------
# Shape and layout checks
# ---------------------------------------------------------------------------------------------------------


def _config_dict(model_config: ModelConfig) -> dict[str, Any]:
    """``ModelConfig`` as the JSON in the checkpoint holds it (nested dataclasses become dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(model_config)))


def _check_model_config(saved: dict[str, Any], current: ModelConfig, directory: Path) -> None:
    """Refuse a checkpoint of another model shape, naming every differing field."""
    mine = _config_dict(current)
    differing = sorted(set(saved) | set(mine), key=lambda name: (name not in mine, name))
    differing = [name for name in differing if saved.get(name) != mine.get(name)]
    if differing:
        details = "; ".join(
            f"{name}: checkpoint {saved.get(name)!r}, model {mine.get(name)!r}" for name in differing
        )
        raise CheckpointError(
            f"{directory} holds another model shape ({details}): build the model with the checkpoint's "
            f"ModelConfig (its '{CHECKPOINT_METADATA}' has it) or point to a checkpoint of this model"
        )


def _check_optimizer_can_resume(saved: dict[str, Any], student: Any, directory: Path) -> None:
    """The saved optimizer must be of the same kind, and a DP-only format needs the same TP and PP."""
    optimizer, layout = saved["optimizer"], saved["layout"]
    distributed = student.optim_config.use_distributed_optimizer
    if optimizer["distributed"] != distributed:
        raise CheckpointError(
            f"{directory} holds {'a distributed' if optimizer['distributed'] else 'a non-distributed'} "
            f"optimizer state but the student uses use_distributed_optimizer={distributed}: resume with "
            f"optim.use_distributed_optimizer={optimizer['distributed']}"
        )
    now = student.groups.layout
    same_model_split = (layout["tensor_parallel"], layout["pipeline_parallel"]) == (
        now.tensor_parallel,
        now.pipeline_parallel,
    )
    if distributed and optimizer["format"] == "dp_reshardable" and not same_model_split:
        raise CheckpointError(
            f"{directory} was saved at TP={layout['tensor_parallel']} PP={layout['pipeline_parallel']} "
            f"with the DP-only optimizer format 'dp_reshardable'; the student runs TP={now.tensor_parallel} "
            f"PP={now.pipeline_parallel}: resume on the saved TP/PP (any DP), or save the run with "
            "optimizer_format='fully_reshardable' (resumable on any layout) before changing it"
        )


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


# ---------------------------------------------------------------------------------------------------------
# Sharded state dicts (model + optimizer) and the torch-Adam workarounds
# ---------------------------------------------------------------------------------------------------------


def _model_metadata(model: torch.nn.Module, optimizer_format: str | None = None) -> dict[str, Any]:
    """``sharded_state_dict`` metadata: the model's own DP group (never the global parallel_state's)."""
    metadata: dict[str, Any] = {"dp_cp_group": model.pg_collection.dp_cp}
    if optimizer_format is not None:
        metadata["distrib_optim_sharding_type"] = optimizer_format
    return metadata


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _uses_torch_adam_distributed(sub_optimizer: Any) -> bool:
    """A DistributedOptimizer over torch's Adam (no TE/apex): the one that needs workarounds 1-3."""
    from megatron.core.optimizer import distrib_optimizer

    return isinstance(sub_optimizer, distrib_optimizer.DistributedOptimizer) and not (
        distrib_optimizer.HAVE_APEX_OR_TE
    )


def _fill_empty_adam_state(sub_optimizer: Any) -> None:
    """Workaround 1: give every main parameter the state torch's Adam would create lazily (zeros, step 0).

    Megatron's ``state_dict()`` asserts one common ``step`` over the Adam state, so an optimizer that has
    not stepped yet could be neither saved nor loaded. Zeros and step 0 are exactly what Adam's first step
    starts from, so the update is unchanged.
    """
    adam = sub_optimizer.optimizer
    for group in adam.param_groups:
        for param in group["params"]:
            if not adam.state[param]:
                adam.state[param].update(
                    step=torch.tensor(0.0, dtype=_adam_step_dtype()),
                    exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                )


def _adam_step_dtype() -> torch.dtype:
    """The dtype torch's Adam keeps ``step`` in (float32 unless the default dtype is float64)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _student_state_dict(student: Any, optimizer_format: str, *, is_loading: bool) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` sharded state dict of the student (the same for save and load)."""
    metadata = _model_metadata(student.module, optimizer_format)
    model_state = student.module.sharded_state_dict(metadata=metadata)
    for sub_optimizer in _sub_optimizers(student.optimizer):
        if _uses_torch_adam_distributed(sub_optimizer):
            _fill_empty_adam_state(sub_optimizer)
    optimizer_state = student.optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optimizer_state}


def _load_distributed_torch_adam(sub_optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Load a DistributedOptimizer over torch's Adam, working around Megatron's ``step`` handling.

    Megatron's ``load_state_dict`` first puts the checkpoint's step into the Adam state, then lets the
    parameter-state loader overwrite every key of that state from the checkpoint: ``dp_reshardable``
    overwrites ``step`` with the loading template's 0 (workaround 2), ``fully_reshardable`` has no
    ``step`` and raises ``KeyError`` (workaround 3). So the parameter state is loaded with ``step``
    hidden, and ``step`` is then set from the checkpoint's param groups -- one tensor per parameter:
    Megatron would share a single tensor, which torch's in-place ``step += 1`` would advance once per
    parameter.
    """
    state_dict = dict(state_dict)
    param_state = state_dict.pop("param_state")
    sharding_type = state_dict.pop("param_state_sharding_type")
    sub_optimizer.load_state_dict(state_dict)  # param groups (lr, betas, step); no parameter state
    steps = {group["step"] for group in state_dict["optimizer"]["param_groups"]}
    assert len(steps) == 1, f"expected one Adam step in the checkpoint, got {steps}"
    adam_states = list(sub_optimizer.optimizer.state.values())
    for adam_state in adam_states:
        adam_state.pop("step", None)
    loaders = {
        "dp_reshardable": sub_optimizer.load_parameter_state_from_dp_reshardable,
        "fully_reshardable": sub_optimizer.load_parameter_state_from_fully_reshardable,
    }
    loaders[sharding_type](param_state)
    step = float(steps.pop())
    for adam_state in adam_states:
        adam_state["step"] = torch.tensor(step, dtype=_adam_step_dtype())


@torch.no_grad()  # the fp32 main parameters can be views of the (leaf) model parameters
def _load_optimizer_state(optimizer: Any, loaded: Any) -> None:
    sub_optimizers = _sub_optimizers(optimizer)
    if not any(_uses_torch_adam_distributed(sub) for sub in sub_optimizers):
        optimizer.load_state_dict(loaded)
        return
    parts = [loaded] if len(sub_optimizers) == 1 else [loaded[index] for index in range(len(sub_optimizers))]
    for sub_optimizer, part in zip(sub_optimizers, parts, strict=True):
        if _uses_torch_adam_distributed(sub_optimizer):
            _load_distributed_torch_adam(sub_optimizer, part)
        else:
            sub_optimizer.load_state_dict(part)


# ---------------------------------------------------------------------------------------------------------
# RNG state (per rank side files)
# ---------------------------------------------------------------------------------------------------------


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank-{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    on_gpu = default_device().type == "cuda"
    return {
        "python": random.getstate(),
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if on_gpu else None,
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    saved_numpy = state["numpy"]
    np.random.set_state(
        (
            saved_numpy["algorithm"],
            saved_numpy["keys"].numpy().astype(np.uint32),
            saved_numpy["position"],
            saved_numpy["has_gauss"],
            saved_numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and default_device().type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _save_rng_state(directory: Path) -> None:
    path = _rng_file(directory, dist.get_rank())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), path)


def _load_rng_state(directory: Path, saved_world_size: int) -> None:
    """Restore this rank's generators when the world size is the saved one (see the module docstring)."""
    if saved_world_size != dist.get_world_size():
        logger.warning(
            "%s was saved by %d ranks, this job has %d: RNG states are per process and are not restored",
            directory,
            saved_world_size,
            dist.get_world_size(),
        )
        return
    _restore_rng_state(torch.load(_rng_file(directory, dist.get_rank()), weights_only=True))


# ---------------------------------------------------------------------------------------------------------
# Atomic save
# ---------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata as package_metadata

    try:
        megatron_version = package_metadata.version("megatron-core")
    except package_metadata.PackageNotFoundError:
        megatron_version = "unknown"
    return {"megatron_core": megatron_version, "torch": torch.__version__}


def _remove_leftovers(parent: Path, prefix: str) -> None:
    """Delete ``prefix*`` entries left by saves that never finished (one job per root: none is running)."""
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        logger.warning("removing %s, left by an unfinished save", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _prepare_save(tmp_dir: Path, final_dir: Path, leftover_prefix: str, may_replace: bool) -> None:
    """Rank 0: check the target, clear leftovers of crashed saves, create the temporary directory."""
    parent = tmp_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    marker = parent / LATEST
    if final_dir.exists() and not may_replace:
        raise CheckpointError(f"{final_dir} already exists: save to a new path, or delete it first")
    if _latest_name(parent) == final_dir.name:
        raise CheckpointError(
            f"{final_dir} is the latest checkpoint ({marker}) and is never overwritten: save under a new "
            "step, or point 'latest' elsewhere first"
        )
    _remove_leftovers(parent, leftover_prefix)
    tmp_dir.mkdir()


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    _write_text_durably(
        directory / CHECKPOINT_METADATA, json.dumps(metadata, indent=1, sort_keys=True) + "\n"
    )


def _point_latest(root: Path, name: str, nonce: str) -> None:
    """Replace ``root/latest`` atomically: readers see the old name or the new one, never a torn file."""
    tmp_marker = root / f"{_TMP_PREFIX}latest-{nonce}"
    _write_text_durably(tmp_marker, name + "\n")
    os.replace(tmp_marker, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep_last: int, newest_step: int) -> None:
    """Keep the ``keep_last`` most recent steps up to ``newest_step``; never the one ``latest`` names.

    Directories numbered above ``newest_step`` (a branch abandoned by resuming from an older step) are
    left alone: a save of that step replaces them once the run gets there.
    """
    latest = _latest_name(root)
    candidates = sorted(step for step in _step_dirs(root) if step <= newest_step)
    for step in candidates[: max(0, len(candidates) - keep_last)]:
        directory = root / step_dir_name(step)
        if directory.name != latest:
            logger.info("removing old checkpoint %s (keep_last=%d)", directory, keep_last)
            shutil.rmtree(directory)


def _publish_step(tmp_dir: Path, final_dir: Path, nonce: str, keep_last: int, step: int) -> None:
    """Rank 0: make the finished save the step directory, then ``latest``, then prune."""
    root = final_dir.parent
    displaced = None
    if final_dir.exists():  # a complete but unpublished save of this step (it is not `latest`)
        displaced = root / f"{_TMP_PREFIX}displaced-{final_dir.name}-{nonce}"
        final_dir.rename(displaced)
    tmp_dir.rename(final_dir)
    _fsync_dir(root)
    _point_latest(root, final_dir.name, nonce)
    if displaced is not None:
        shutil.rmtree(displaced)
    _prune(root, keep_last, step)


def _publish_weights(tmp_dir: Path, final_dir: Path) -> None:
    tmp_dir.rename(final_dir)
    _fsync_dir(final_dir.parent)


def _write_in_tmp_dir(
    final_dir: Path, leftover_prefix: str, may_replace: bool, write: Callable[[Path], None], metadata: dict
) -> tuple[Path, str]:
    """Collective: every rank writes its part into a fresh temporary sibling of ``final_dir``.

    Returns the temporary directory, complete (our metadata file is written last, after a barrier), and
    the nonce in its name.
    """
    nonce = _on_rank0(secrets.token_hex, 4)  # one name on every rank
    tmp_dir = final_dir.parent / f"{_TMP_PREFIX}{final_dir.name}-{nonce}"
    _on_rank0(_prepare_save, tmp_dir, final_dir, leftover_prefix, may_replace)
    write(tmp_dir)
    dist.barrier()  # every shard and side file is on disk
    metadata = {**metadata, "integrity": _record_files(tmp_dir)}
    _on_rank0(_write_metadata, tmp_dir, metadata)
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
        "model_config": _config_dict(student.model_config),
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

    from megatron_tropd.signals import ignore_stop_signals_in_helper

    if filesystem_async._results_queue is None:  # the writer's own lazily made queue, made our way
        manager = SyncManager(ctx=torch.multiprocessing.get_context("spawn"))
        manager.start(initializer=ignore_stop_signals_in_helper)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    return get_default_save_sharded_strategy()


def _local_tensors_finite(student: Any) -> bool:
    """This rank's parameters and optimizer-state tensors (Adam moments) are all finite."""
    tensors = [param.detach() for param in student.model.parameters()]
    for sub_optimizer in _sub_optimizers(student.optimizer):
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


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    student: Any,
    loop_state: dict[str, Any],
    keep_last: int = 3,
    *,
    optimizer_format: str = "dp_reshardable",
) -> Path | None:
    """Save the student's full training state as ``root/step-XXXXXXX`` and point ``root/latest`` at it.

    Collective over the default process group. ``loop_state`` (step, data position, guidance schedule,
    ...) must be JSON-serialisable; ``load_checkpoint`` returns it. ``optimizer_format`` is the
    DistributedOptimizer's layout on disk: ``dp_reshardable`` (resume on the same TP/PP, any DP) or
    ``fully_reshardable`` (resume on any layout; gathers the optimizer state over DP while saving).
    Keeps the ``keep_last`` newest step directories. Returns the new step directory, or None when a
    parameter or optimizer-state tensor is non-finite on any rank: nothing is written or pruned then.
    """
    _check_save_arguments(step, keep_last, optimizer_format, loop_state)
    if not _student_finite_everywhere(student):
        logger.error(
            "step %d: the student's parameters or optimizer state hold NaN or inf on some rank; this "
            "checkpoint is not saved and no older checkpoint is removed", step
        )  # fmt: skip
        return None
    final_dir = Path(root) / step_dir_name(step)
    metadata = _train_metadata(step, student, loop_state, optimizer_format)

    def write(directory: Path) -> None:
        from megatron.core import dist_checkpointing

        state = _student_state_dict(student, optimizer_format, is_loading=False)
        dist_checkpointing.save(state, str(directory), sharded_strategy=signal_safe_save_strategy())
        _save_rng_state(directory)

    tmp_dir, nonce = _write_in_tmp_dir(final_dir, _TMP_PREFIX, True, write, metadata)
    _on_rank0(_publish_step, tmp_dir, final_dir, nonce, keep_last, step)
    logger.info("saved checkpoint %s", final_dir)
    return final_dir


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel stage inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_model_weights(path: str | os.PathLike, model: torch.nn.Module, model_config: ModelConfig) -> Path:
    """Save only a model's weights (any layout) as the dist-checkpoint directory ``path``.

    Collective. For teachers and HF conversion: ``load_model_weights`` reads it into any TP/PP layout.
    ``path`` must not exist yet; it appears complete or not at all.
    """
    final_dir = Path(path)
    module = _unwrap(model)
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "weights",
        "model_config": _config_dict(model_config),
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
            {"model": module.sharded_state_dict(metadata=_model_metadata(module))},
            str(directory),
            sharded_strategy=signal_safe_save_strategy(),
        )

    leftover_prefix = f"{_TMP_PREFIX}{final_dir.name}-"
    tmp_dir, _ = _write_in_tmp_dir(final_dir, leftover_prefix, False, write, metadata)
    _on_rank0(_publish_weights, tmp_dir, final_dir)
    logger.info("saved model weights %s", final_dir)
    return final_dir


# ---------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------


def _train_metadata_of(directory: Path) -> dict[str, Any]:
    metadata = _read_metadata(directory)
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
        latest = _resolve_latest(root)
    except CheckpointError as exc:
        if on_damaged == "fail":
            raise
        logger.warning("%s; looking for the newest intact checkpoint (checkpoint.on_damaged=previous)", exc)
        latest, newest = None, None
    else:
        if latest is None:
            return None
        newest = int(_STEP_DIR.match(latest.name).group(1))
    directories = [latest] if latest is not None else []
    if on_damaged == "previous":
        earlier = [
            p for step, p in sorted(_step_dirs(root).items(), reverse=True) if newest is None or step < newest
        ]
        directories += [p for p in earlier if not _missing_files(p)]
    candidates = []
    for directory in directories:
        try:
            candidates.append((directory, _train_metadata_of(directory), None))
        except CheckpointError as exc:
            if on_damaged == "fail":
                raise
            candidates.append((directory, None, str(exc)))
    return candidates


def _latest_name(root: Path) -> str:
    """What ``root/latest`` holds, undecodable bytes replaced ("" without a marker)."""
    marker = root / LATEST
    return marker.read_bytes().decode("utf-8", errors="replace").strip() if marker.is_file() else ""


def _move_aside(root: Path, damaged: list[Path], chosen: Path) -> None:
    """Rank 0, after falling back: keep the damaged directories out of the way (renamed, never deleted)
    and point ``latest`` at the one resumed, so later saves of those steps are not refused."""
    nonce = secrets.token_hex(4)
    for directory in damaged:
        target = root / f"{_DAMAGED_PREFIX}{directory.name}-{nonce}"
        directory.rename(target)
        logger.warning("moved the damaged checkpoint %s to %s", directory, target)
    _point_latest(root, chosen.name, nonce)


def _find_intact(root: Path, on_damaged: str) -> tuple[Path, dict[str, Any]] | None:
    """Collective: the newest checkpoint to resume from whose files match their manifest, or None for a
    fresh start. A damaged one raises (``fail``) or is skipped with a warning (``previous``)."""
    if on_damaged not in ON_DAMAGED:
        raise CheckpointError(f"on_damaged must be one of {ON_DAMAGED}; got {on_damaged!r}")
    candidates = _on_rank0(_resume_candidates, root, on_damaged)
    if candidates is None:
        return None
    named_by_latest = _on_rank0(_latest_name, root)
    damaged: list[Path] = []
    for directory, metadata, unreadable in candidates:
        problems = [unreadable] if unreadable else _damage(directory, metadata)
        if not problems:
            if damaged or directory.name != named_by_latest:
                _on_rank0(_move_aside, root, damaged, directory)
            return directory, metadata
        if on_damaged == "fail":
            raise CheckpointError(
                f"checkpoint {directory} (step {metadata['step']}) is damaged: {_damage_summary(problems)}. "
                "Restore those files, or set checkpoint.on_damaged=previous to resume from the newest intact "
                "earlier step"
            )
        if _is_rank0():
            logger.warning(
                "checkpoint %s is damaged (%s); trying an earlier step", directory, _damage_summary(problems)
            )
        damaged.append(directory)
    raise CheckpointError(
        f"no intact checkpoint in {root}: damaged {[p.name for p in damaged]}. Restore the damaged files, or "
        "start from scratch in another checkpoint.save_dir"
    )


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
    """
    found = _find_intact(Path(root), on_damaged)
    if found is None:
        return None
    directory, metadata = found
    _check_model_config(metadata["model_config"], student.model_config, directory)
    _check_optimizer_can_resume(metadata, student, directory)

    from megatron.core import dist_checkpointing

    optimizer_format = metadata["optimizer"]["format"]
    sharding_type = optimizer_format if optimizer_format in OPTIMIZER_FORMATS else None
    state = _student_state_dict(student, sharding_type, is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    student.module.load_state_dict(loaded["model"])
    _load_optimizer_state(student.optimizer, loaded["optimizer"])
    _load_scheduler(student.scheduler, metadata["scheduler"], directory)
    _load_rng_state(directory, metadata["layout"]["world_size"])
    logger.info("resumed from %s (step %d)", directory, metadata["step"])
    return metadata["loop_state"]


def _find_weights(path: Path) -> tuple[Path, dict[str, Any]]:
    """Rank 0: the checkpoint directory at ``path`` (or named by ``path/latest``) and its metadata."""
    if not path.exists():
        raise CheckpointError(
            f"model checkpoint {path} does not exist: pass a directory written by save_model_weights or "
            "save_checkpoint (or a run root with a 'latest' marker)"
        )
    directory = _resolve_latest(path) if (path / LATEST).is_file() else path
    missing = _missing_files(directory)
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (no {', '.join(missing)}): pass a directory written "
            "by save_model_weights or save_checkpoint"
        )
    return directory, _read_metadata(directory)


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


@torch.no_grad()
def load_model_weights(
    path: str | os.PathLike, model: torch.nn.Module, model_config: ModelConfig | None = None
) -> None:
    """Load weights into ``model`` (any TP/PP layout, its own process groups); never writes to ``path``.

    Collective. ``path``: a ``save_model_weights`` directory, a ``save_checkpoint`` step directory, or a
    run root (its ``latest``). With ``model_config`` a checkpoint of another shape is refused naming the
    differing fields; without it, by the tensors' names and shapes. Either check runs before any load.
    """
    directory, metadata = _on_rank0(_find_weights, Path(path))
    problems = _damage(directory, metadata)
    if problems:
        raise CheckpointError(
            f"model checkpoint {directory} is damaged: {_damage_summary(problems)}. Restore those files or "
            "convert the model again (tools/convert.py import)"
        )
    if model_config is not None:
        _check_model_config(metadata["model_config"], model_config, directory)
    module = _unwrap(model)
    state = {"model": module.sharded_state_dict(metadata=_model_metadata(module))}
    _raise_on_shape_problems(state["model"], directory)

    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(state, str(directory))
    module.load_state_dict(loaded["model"])
