"""Collective wrappers of ``megatron_tropd.integrity``: every file's size and hash, recorded at save and
checked at load, the hashing split over ranks by file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_tropd import integrity
from megatron_tropd.checkpoint.collective import is_rank0, on_every_rank, on_rank0
from megatron_tropd.checkpoint.layout import CHECKPOINT_METADATA

logger = logging.getLogger(__name__)


def record_files(directory: Path) -> dict[str, Any]:
    """Collective: the manifest of every file in ``directory`` but our metadata, hashed by all ranks."""
    names = on_rank0(integrity.list_files, directory, (CHECKPOINT_METADATA,))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    parts = on_every_rank(integrity.hash_files, directory, integrity.share(names, rank, world_size))
    files = {name: entry for part in parts for name, entry in part.items()}
    return {"hash": integrity.HASH_NAME, "files": dict(sorted(files.items()))}


def damage(directory: Path, metadata: dict[str, Any]) -> list[str]:
    """Collective: what is wrong with the files of ``directory`` against its manifest (empty: intact).

    A checkpoint written without a manifest is loaded unverified, with a warning.
    """
    record = metadata.get("integrity")
    if record is None:
        if is_rank0():
            logger.warning(
                "%s has no file manifest (saved by an older release): loading it unverified", directory
            )
        return []
    manifest = record["files"]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = integrity.share(sorted(manifest), rank, world_size)
    parts = on_every_rank(integrity.check_files, directory, manifest, mine)
    return sorted(problem for part in parts for problem in part)


def damage_summary(problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")
