"""Saves written in the background (``checkpoint.async_save``), published only once complete.

Megatron's asynchronous sharded save splits a save in two: ``dist_checkpointing.save(...,
async_sharded_save=True)`` plans it and returns an ``AsyncRequest``; a helper process forked from the rank
(``AsyncCallsQueue``, one short-lived process per save) writes the shards; the request's finalize steps
(the ``.metadata`` and ``metadata.json`` files) run on every rank once every rank's helper is done.

Here the request is staged before the helper starts: every tensor it writes is copied into fresh host
memory, so training may change its buffers at once. The helper ignores the stop signals and Ctrl-C and
dies with its rank (``signals``), like the writer's result queue (``signal_safe_save_strategy``).
Finalizing runs Megatron's steps, then ours (manifest over all ranks, ``tropd_checkpoint.json``, the
atomic publish of the step and of ``latest``, pruning), exactly as a synchronous save does.

One save is pending per process at most: every save and load finalizes it first. Until it is finalized
the step exists only as its temporary directory, so a crash at any point leaves ``latest`` naming the
previous complete step (the next save removes the leftover directory). Collective over the default
process group, except ``abandon_pending_save``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from megatron_tropd.checkpoint.errors import CheckpointError
from megatron_tropd.signals import ignore_stop_signals_in_helper, stop_signals_held

logger = logging.getLogger(__name__)


@dataclass
class _PendingSave:
    calls: Any  # megatron's AsyncCallsQueue holding the one request
    step_dir: Path  # where the save is published
    finish: Callable[[], None]  # manifest, metadata, publish (collective)


_pending: _PendingSave | None = None


def _staged(write_buckets: list) -> list:
    """Megatron's write buckets with every tensor copied into fresh host memory (none a view of a
    training buffer): ``(file, storage key, (byte items, tensor items))``."""
    return [
        (path, key, (byte_items, [(item, tensor.detach().to("cpu", copy=True)) for item, tensor in tensors]))
        for path, key, (byte_items, tensors) in write_buckets
    ]


def _write_in_helper(write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Entry point of the forked writer: out of the stop signals' way, dying with its rank (it is forked
    inside ``stop_signals_held``, so none of them can reach it before this)."""
    ignore_stop_signals_in_helper()
    write(*args, **kwargs)


def _staged_request(request: Any) -> Any:
    """The request with our staging and helper entry point (unchanged where this rank writes nothing)."""
    if request.async_fn is None:
        return request
    return request._replace(
        async_fn=partial(_write_in_helper, request.async_fn),
        preload_fn=partial(_staged, request.async_fn_args[1]),
    )


def start_background_save(request: Any, step_dir: Path, finish: Callable[[], None]) -> None:
    """Collective: stage ``request`` and start its writer; ``finish`` runs when it is finalized."""
    global _pending
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    if _pending is not None:
        raise CheckpointError(f"a background save of {_pending.step_dir} is pending: finalize it first")
    calls = AsyncCallsQueue(persistent=False)
    with stop_signals_held():
        calls.schedule_async_request(_staged_request(request))
    _pending = _PendingSave(calls, step_dir, finish)


def finalize_pending_save(blocking: bool = True) -> Path | None:
    """Collective: publish the pending background save once every rank's writer is done.

    ``blocking``: wait for the writers; otherwise return None at once when some rank is still writing.
    Returns the published step directory (None when nothing was pending or it is still being written).
    A failed write raises ``CheckpointError`` on every rank; nothing is published then.
    """
    global _pending
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: no Exception

    pending = _pending
    if pending is None:
        return None
    try:
        finalized = pending.calls.maybe_finalize_async_calls(blocking=blocking)
    except (Exception, CheckpointException) as exc:
        _pending = None
        raise CheckpointError(
            f"the background save of {pending.step_dir} failed ({type(exc).__name__}: {exc}); it is not "
            "published and 'latest' still names the previous checkpoint"
        ) from exc
    if not finalized:
        return None
    _pending = None
    pending.finish()
    return pending.step_dir


def abandon_pending_save() -> None:
    """Local: kill this rank's writer and forget the pending save, publishing nothing (a failing run;
    the next save removes its temporary directory)."""
    global _pending
    if _pending is None:
        return
    logger.warning("abandoning the unfinished background save of %s", _pending.step_dir)
    for call in _pending.calls.async_calls:
        call.async_caller.close(abort=True)
    _pending = None
