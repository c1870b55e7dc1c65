"""The row transfer between two layouts: the pure plan (no processes) and its executor (gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from megatron_tropd.spawn import run_on_ranks
from megatron_tropd.transfer import RowHolder, plan_row_transfer


def _holders(ranks_and_rows):
    return [RowHolder(rank, start, stop) for rank, (start, stop) in ranks_and_rows]


@pytest.mark.parametrize(
    ("senders", "receivers"),
    [
        ([(0, (0, 8))], [(0, (0, 4)), (1, (4, 8))]),  # teacher DP1 -> student DP2
        ([(0, (0, 4)), (2, (4, 8))], [(1, (0, 8)), (3, (0, 8))]),  # DP2 -> DP1 with two TP ranks
        ([(0, (0, 3)), (1, (3, 6)), (2, (6, 9))], [(0, (0, 9 // 2)), (3, (9 // 2, 9))]),  # uneven overlaps
    ],
)
def test_plan_covers_every_received_row_exactly_once(senders, receivers):
    plan = plan_row_transfer(_holders(senders), _holders(receivers))
    for receiver in _holders(receivers):
        covered = sorted(row for t in plan if t.receiver == receiver for row in range(t.start, t.stop))
        assert covered == list(range(receiver.start, receiver.stop))
    for transfer in plan:
        assert transfer.sender.start <= transfer.start < transfer.stop <= transfer.sender.stop
        assert transfer.local == (transfer.sender.rank == transfer.receiver.rank)
    assert plan == plan_row_transfer(_holders(senders), _holders(receivers))  # every rank plans alike


def transfer_worker(rank, world_size):
    """Rows 0..5 computed on rank 0 (all) go to ranks 0 and 1 (three each), bools and ints included."""
    from megatron_tropd.transfer import move_rows

    rows = torch.arange(6)
    local = {"value": rows.float()[:, None] * 10, "flag": rows % 2 == 0} if rank == 0 else None
    template = {"value": ((1,), torch.float32), "flag": ((), torch.bool)}
    plan = plan_row_transfer([RowHolder(0, 0, 6)], [RowHolder(0, 0, 3), RowHolder(1, 3, 6)])
    out = move_rows(local, plan, template, torch.device("cpu"))
    return {name: tensor.tolist() for name, tensor in out.items()}


def test_move_rows_delivers_each_receivers_rows_with_their_dtypes():
    first, second = run_on_ranks(transfer_worker, 2)
    assert first == {"value": [[0.0], [10.0], [20.0]], "flag": [True, False, True]}
    assert second == {"value": [[30.0], [40.0], [50.0]], "flag": [False, True, False]}
