"""RNG state: one side file per rank, ``rng/rank-00000.pt``.

Per-rank files rather than a ``ShardedObject``: RNG streams belong to processes, not to tensor shards, so
they are restored only when the world size is unchanged (with another world size there is no meaningful
mapping; the freshly seeded streams are kept, with a warning).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_tropd.runtime import default_device

logger = logging.getLogger(__name__)

RNG_DIR = "rng"


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


def save_rng_state(directory: Path) -> None:
    path = _rng_file(directory, dist.get_rank())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), path)


def load_rng_state(directory: Path, saved_world_size: int) -> None:
    """Restore this rank's generators when the world size is the saved one."""
    if saved_world_size != dist.get_world_size():
        logger.warning(
            "%s was saved by %d ranks, this job has %d: RNG states are per process and are not restored",
            directory,
            saved_world_size,
            dist.get_world_size(),
        )
        return
    _restore_rng_state(torch.load(_rng_file(directory, dist.get_rank()), weights_only=True))
