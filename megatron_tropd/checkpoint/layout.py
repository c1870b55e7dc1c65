"""The checkpoint root on disk: directory names, the ``latest`` marker, publishing, pruning, damaged steps.

Every function here is local; the ones that change the root run on rank 0 only (``collective.on_rank0``),
so that ranks never disagree about what is on disk.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from megatron_tropd.checkpoint.atomic import fsync_dir, publish_directory, write_text_durably
from megatron_tropd.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_METADATA = "tropd_checkpoint.json"
"""Our metadata file inside a checkpoint directory; its presence marks the directory complete."""
MEGATRON_METADATA = "metadata.json"
"""Written by dist-checkpointing once all shards are saved."""
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d{7,})$")
TMP_PREFIX = "tmp-"
DAMAGED_PREFIX = "damaged-"


def step_dir_name(step: int) -> str:
    """``step-0000042``: zero-padded so that names sort by step."""
    return f"step-{step:07d}"


def step_of(directory: Path) -> int:
    """The step a step directory's name holds."""
    return int(STEP_DIR.match(directory.name).group(1))


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------


def step_dirs(root: Path) -> dict[int, Path]:
    """Step directories in ``root`` (complete or not), by step."""
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def missing_files(directory: Path) -> list[str]:
    return [name for name in (MEGATRON_METADATA, CHECKPOINT_METADATA) if not (directory / name).is_file()]


def _complete_step_names(root: Path) -> list[str]:
    return [p.name for _, p in sorted(step_dirs(root).items()) if not missing_files(p)]


def latest_name(root: Path) -> str:
    """What ``root/latest`` holds, undecodable bytes replaced ("" without a marker)."""
    marker = root / LATEST
    return marker.read_bytes().decode("utf-8", errors="replace").strip() if marker.is_file() else ""


def resolve_latest(root: Path) -> Path | None:
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
    name = latest_name(root)
    if len(name) > 80:
        name = name[:80] + "..."
    fix = (
        f"write the name of a complete step directory into {marker} (complete: "
        f"{_complete_step_names(root) or 'none'}), or delete {marker} to start from scratch"
    )
    if name.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"{marker} names {name!r}, the temporary directory of an unfinished save: {fix}"
        )
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{marker} holds {name!r}, which is not a step directory name: {fix}")
    directory = root / name
    if not directory.is_dir():
        raise CheckpointError(f"{marker} names {name!r} but {directory} does not exist: {fix}")
    missing = missing_files(directory)
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
    return resolve_latest(Path(root))


# ---------------------------------------------------------------------------------------------------------
# Saving: the temporary directory, publishing, the marker, pruning (rank 0)
# ---------------------------------------------------------------------------------------------------------


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


def prepare_save(tmp_dir: Path, final_dir: Path, leftover_prefix: str, may_replace: bool) -> None:
    """Check the target, clear leftovers of crashed saves, create the temporary directory."""
    parent = tmp_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    marker = parent / LATEST
    if final_dir.exists() and not may_replace:
        raise CheckpointError(f"{final_dir} already exists: save to a new path, or delete it first")
    if latest_name(parent) == final_dir.name:
        raise CheckpointError(
            f"{final_dir} is the latest checkpoint ({marker}) and is never overwritten: save under a new "
            "step, or point 'latest' elsewhere first"
        )
    _remove_leftovers(parent, leftover_prefix)
    tmp_dir.mkdir()


def point_latest(root: Path, name: str, nonce: str) -> None:
    """Replace ``root/latest`` atomically: readers see the old name or the new one, never a torn file."""
    tmp_marker = root / f"{TMP_PREFIX}latest-{nonce}"
    write_text_durably(tmp_marker, name + "\n")
    os.replace(tmp_marker, root / LATEST)
    fsync_dir(root)


def _prune(root: Path, keep_last: int, newest_step: int) -> None:
    """Keep the ``keep_last`` most recent steps up to ``newest_step``; never the one ``latest`` names.

    Directories numbered above ``newest_step`` (a branch abandoned by resuming from an older step) are
    left alone: a save of that step replaces them once the run gets there.
    """
    latest = latest_name(root)
    candidates = sorted(step for step in step_dirs(root) if step <= newest_step)
    for step in candidates[: max(0, len(candidates) - keep_last)]:
        directory = root / step_dir_name(step)
        if directory.name != latest:
            logger.info("removing old checkpoint %s (keep_last=%d)", directory, keep_last)
            shutil.rmtree(directory)


def publish_step(tmp_dir: Path, final_dir: Path, nonce: str, keep_last: int, step: int) -> None:
    """Make the finished save the step directory, then ``latest``, then prune.

    A complete but unpublished save of this step (it is not ``latest``) is displaced, and deleted only
    once ``latest`` names the new one.
    """
    root = final_dir.parent
    aside = root / f"{TMP_PREFIX}displaced-{final_dir.name}-{nonce}"
    displaced = publish_directory(tmp_dir, final_dir, aside=aside)
    point_latest(root, final_dir.name, nonce)
    if displaced is not None:
        shutil.rmtree(displaced)
    _prune(root, keep_last, step)


def publish_weights(tmp_dir: Path, final_dir: Path) -> None:
    publish_directory(tmp_dir, final_dir)


# ---------------------------------------------------------------------------------------------------------
# Resuming past damaged steps (rank 0)
# ---------------------------------------------------------------------------------------------------------


def move_aside(root: Path, damaged: list[Path], chosen: Path) -> None:
    """After falling back: keep the damaged directories out of the way (renamed, never deleted) and point
    ``latest`` at the one resumed, so later saves of those steps are not refused."""
    nonce = secrets.token_hex(4)
    for directory in damaged:
        target = root / f"{DAMAGED_PREFIX}{directory.name}-{nonce}"
        directory.rename(target)
        logger.warning("moved the damaged checkpoint %s to %s", directory, target)
    point_latest(root, chosen.name, nonce)
