"""Rank-0 decisions shared with every rank, and per-rank work whose failures every rank sees.

File-system decisions (which directory ``latest`` names, renames, pruning) are taken once, so that ranks
can never disagree, and an error on any rank is raised on every rank instead of leaving the others waiting
in the next collective. Collective over the default process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from megatron_tropd.checkpoint.errors import CheckpointError


def is_rank0() -> bool:
    return dist.get_rank() == 0


def on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on rank 0 and hand its result (or its failure) to every rank."""
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if is_rank0():
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


def on_every_rank(fn: Callable[..., Any], *args: Any) -> list[Any]:
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
