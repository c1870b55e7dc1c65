"""Moving per-row results between two models' layouts: a pure plan of which rows go where, and an executor.

The teacher and the student split the global batch over their own data-parallel ranks, so the ranks that
computed the teacher's signals for a row (its last pipeline stage) are generally not the ranks that train
on it (the student's last stage, every TP rank). ``plan_row_transfer`` decides, from the two layouts alone,
which row ranges travel from which rank to which; ``move_rows`` carries them out with point-to-point
messages (one per field and overlapping pair) and local copies where sender and receiver coincide.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tropd.topology import ModelGroups, grid_position, replica_rows

FieldTemplate = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Each field's per-row shape and dtype, so that receivers can allocate before the data arrives."""


@dataclass(frozen=True)
class RowHolder:
    """Rows ``[start, stop)`` of the global batch live on global rank ``rank``."""

    rank: int
    start: int
    stop: int


@dataclass(frozen=True)
class RowTransfer:
    """Rows ``[start, stop)`` of the global batch go from ``sender`` to ``receiver``."""

    sender: RowHolder
    receiver: RowHolder
    start: int
    stop: int

    @property
    def local(self) -> bool:
        return self.sender.rank == self.receiver.rank


def last_stage_holders(
    groups: ModelGroups,
    num_rows: int,
    world_size: int,
    first_tp_only: bool,
    lengths: Sequence[int] | None = None,
    uneven: bool = False,
) -> list[RowHolder]:
    """Which ranks hold which rows of per-sequence results on a model's last pipeline stage
    (``first_tp_only``: one holder per data-parallel replica, its TP rank 0). ``lengths`` and ``uneven``:
    how the data-parallel ranks split the rows (``placed.PlacedModel.rows``)."""
    holders = []
    for rank in range(world_size):
        position = grid_position(rank, groups.layout, groups.data_parallel)
        if position.pp_rank != groups.layout.pipeline_parallel - 1 or (first_tp_only and position.tp_rank):
            continue
        rows = replica_rows(num_rows, groups.data_parallel, position.dp_rank, lengths, uneven)
        holders.append(RowHolder(rank, rows.start, rows.stop))
    return holders


def plan_row_transfer(senders: list[RowHolder], receivers: list[RowHolder]) -> list[RowTransfer]:
    """Every overlap of a sender's rows with a receiver's, in a fixed order that every rank computes
    alike (senders, then receivers, as listed); pure, no communication."""
    plan = []
    for sender in senders:
        for receiver in receivers:
            start, stop = max(sender.start, receiver.start), min(sender.stop, receiver.stop)
            if start < stop:
                plan.append(RowTransfer(sender, receiver, start, stop))
    return plan


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """Booleans travel as uint8 (gloo sends no bool tensors)."""
    return torch.uint8 if dtype == torch.bool else dtype


def _receive_buffers(holder: RowHolder, template: FieldTemplate, device: torch.device) -> dict:
    rows = holder.stop - holder.start
    return {
        name: torch.empty(rows, *shape, dtype=_wire_dtype(dtype), device=device)
        for name, (shape, dtype) in template.items()
    }


def move_rows(
    local: dict[str, torch.Tensor] | None,
    plan: list[RowTransfer],
    template: FieldTemplate,
    device: torch.device,
) -> dict[str, torch.Tensor] | None:
    """Carry out ``plan`` from this rank's side: send the rows of ``local`` it holds, receive the rows it
    is planned to get. Returns this rank's received rows (dtypes as in ``template``), or None if the plan
    gives it none."""
    me = dist.get_rank()
    mine = next((t.receiver for t in plan if t.receiver.rank == me), None)
    out = _receive_buffers(mine, template, device) if mine is not None else None
    operations = []
    for transfer in (t for t in plan if me in (t.sender.rank, t.receiver.rank)):
        sent = slice(transfer.start - transfer.sender.start, transfer.stop - transfer.sender.start)
        received = slice(transfer.start - transfer.receiver.start, transfer.stop - transfer.receiver.start)
        for name in sorted(template):
            if transfer.sender.rank == me:
                payload = local[name][sent].to(_wire_dtype(local[name].dtype)).contiguous()
                if transfer.local:
                    out[name][received] = payload
                else:
                    operations.append(dist.P2POp(dist.isend, payload, transfer.receiver.rank))
            else:
                operations.append(dist.P2POp(dist.irecv, out[name][received], transfer.sender.rank))
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    if out is None:
        return None
    return {name: tensor.to(template[name][1]) for name, tensor in out.items()}


def into_subset(holders: list[RowHolder], subset: Sequence[int]) -> list[RowHolder]:
    """``holders`` of rows of a global batch, re-expressed over the sub-batch of global rows ``subset``
    (ascending): a holder of ``[start, stop)`` holds the sub-batch rows that fall in it, which are
    contiguous there too."""
    return [
        RowHolder(h.rank, bisect.bisect_left(subset, h.start), bisect.bisect_left(subset, h.stop))
        for h in holders
    ]
