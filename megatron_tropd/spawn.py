"""Run a function on N local processes joined by a gloo process group.

Used by the multi-process tests and the benchmarks: every sharded computation is checked against its
single-device reference in real separate processes, exactly as it runs under torchrun.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tropd.runtime import shutdown_distributed
from megatron_tropd.signals import set_parent_death_signal


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, result_dir: str, fn: Callable, args: tuple, backend: str
) -> None:
    set_parent_death_signal()  # a killed test run takes its ranks down instead of leaving them waiting
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        torch.save({"ok": True, "value": fn(rank, world_size, *args)}, path)
    except BaseException:  # report every failure to the parent, whatever its type
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        # Megatron's groups first, then the default group (a no-op when fn already shut down).
        shutdown_distributed()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes.

    ``fn`` must be importable (module level). Returns the per-rank return values in rank order; a failure
    on any rank raises ``RuntimeError`` carrying that rank's traceback. ``backend="nccl"`` (benchmarks on
    GPUs) binds rank ``r`` to GPU ``r``.
    """
    with tempfile.TemporaryDirectory(prefix="tropd_spawn_") as result_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), result_dir, fn, args, backend),
            nprocs=world_size,
            start_method="spawn",
            join=False,
        )
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is read back below
        results = []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} exited without a result (killed or crashed)")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["value"])
        return results
