"""Sequence packing: variable-length rollouts run as packed microbatches of at most a token budget.

A rollout batch is stored right-padded ``[N, S]`` (``batch.py``); most of a heavy-tailed batch is then
padding. For scoring and training, ``plan_packs`` puts whole sequences into microbatches of at most
``optim.max_tokens_per_microbatch`` tokens (first-fit decreasing), and ``pack_rows`` lays each out as one
row ``[1, T]``: the sequences' tokens back to back, position ids restarting at 0, and Megatron's
``PackedSeqParams`` (THD, cumulative sequence lengths) so that attention never crosses a sequence
boundary: Transformer-Engine's attention reads the boundaries itself; on Megatron's local layers
``models.PackedDotProductAttention`` turns them into a block-diagonal causal mask. ``unpack_rows`` puts
per-token results back into the padded ``[N, S]`` layout (zeros past each sequence's end).

Every per-token field is label-aligned (index ``t`` predicts token ``t + 1``), so a sequence's last
position carries no loss; packed, its "label" is the next sequence's first token, which is never
loss-bearing either. Losses are sums over loss-bearing tokens divided by the global count, so packing
changes the order of summation and nothing else.

Data-parallel ranks get contiguous row ranges of balanced token counts (``token_balanced_ranges``), not
equal row counts, so no rank waits for one that drew the long rollouts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from megatron_tropd.batch import RolloutBatch


def sequence_lengths(batch: RolloutBatch) -> list[int]:
    """Each row's length in tokens (prompt + response): one past its last loss-bearing label's token.

    A row without any loss-bearing label counts as the full padded length (it is run as it is stored)."""
    seq_length = batch.seq_length
    positions = torch.arange(seq_length, device=batch.loss_mask.device)
    last_label = torch.where(batch.loss_mask, positions, -1).amax(dim=1)  # [N]
    lengths = torch.where(last_label >= 0, last_label + 2, seq_length).clamp_max(seq_length)
    return lengths.tolist()


def plan_packs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices of each packed microbatch: first-fit decreasing bin packing of ``lengths`` into bins
    of ``max_tokens``. Deterministic (ties keep row order), and within a bin rows keep ascending order."""
    too_long = [(row, n) for row, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        row, length = too_long[0]
        raise ValueError(
            f"sequence {row} has {length} tokens but optim.max_tokens_per_microbatch is {max_tokens}: a "
            "sequence is never split; raise the budget to at least rollout.max_prompt_length + "
            "rollout.max_new_tokens"
        )
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    bins: list[list[int]] = []
    free: list[int] = []
    for row in order:
        target = next((index for index, space in enumerate(free) if space >= lengths[row]), None)
        if target is None:
            bins.append([])
            free.append(max_tokens)
            target = len(bins) - 1
        bins[target].append(row)
        free[target] -= lengths[row]
    return [sorted(rows) for rows in bins]


def token_balanced_ranges(lengths: Sequence[int], parts: int, allow_empty: bool = False) -> list[slice]:
    """``parts`` contiguous row ranges with token counts as even as a contiguous split allows: each split
    is the row boundary whose running total is nearest its share. Every range holds at least one row,
    unless ``allow_empty`` (a sub-batch that may have fewer rows than ranks: the last ranges are empty)."""
    if len(lengths) < parts:
        if allow_empty:
            return [slice(min(part, len(lengths)), min(part + 1, len(lengths))) for part in range(parts)]
        raise ValueError(
            f"{len(lengths)} sequences cannot be split over {parts} data-parallel ranks; generate at least "
            "one rollout per data-parallel rank"
        )
    before = [0, *itertools.accumulate(lengths)]  # before[c]: tokens of rows [0, c)
    bounds = [0]
    for part in range(1, parts):
        target = before[-1] * part / parts
        first, last = bounds[-1] + 1, len(lengths) - (parts - part)  # a row for every range
        bounds.append(min(range(first, last + 1), key=lambda cut: (abs(before[cut] - target), cut)))
    bounds.append(len(lengths))
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class PackedMicrobatch:
    """Rows of a batch laid out as one packed row of ``T`` tokens."""

    fields: dict[str, torch.Tensor]
    """Each per-token field of the rows, back to back along the sequence axis (``[1, T]``, ``[1, T, k]``)."""
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # [n + 1] int32: sequence boundaries (a final padding run is a sequence too)
    max_seqlen: int
    rows: list[int]
    """Which rows of the source batch, in packing order."""
    lengths: list[int]

    def packed_seq_params(self):
        """Megatron's ``PackedSeqParams`` (THD) for this microbatch."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen,
        )  # fmt: skip

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[1]


def _concat_field(value: torch.Tensor, rows: list[int], lengths: list[int], pad: int) -> torch.Tensor:
    """Row ``rows[i]``'s first ``lengths[i]`` positions of a ``[N, S, ...]`` field, back to back, then
    ``pad`` zero positions; shape ``[1, sum(lengths) + pad, ...]``."""
    pieces = [value[row, :length] for row, length in zip(rows, lengths, strict=True)]
    if pad:
        pieces.append(value.new_zeros((pad, *value.shape[2:])))
    return torch.cat(pieces).unsqueeze(0)


def pack_fields(
    values: dict[str, torch.Tensor], rows: list[int], lengths: Sequence[int], pad_to: int = 0
) -> PackedMicrobatch:
    """Pack ``rows`` of the ``[N, S, ...]`` fields ``values`` (each row cut to ``lengths[row]``) into one
    row, right-padded with zeros to ``pad_to`` tokens when that is longer (pipeline stages exchange
    fixed shapes); the padding is a sequence of its own, so nothing attends across it."""
    row_lengths = [int(lengths[row]) for row in rows]
    pad = max(pad_to - sum(row_lengths), 0)
    segments = row_lengths + ([pad] if pad else [])
    device = next(iter(values.values())).device
    return PackedMicrobatch(
        fields={name: _concat_field(value, rows, row_lengths, pad) for name, value in values.items()},
        position_ids=torch.cat([torch.arange(n, device=device) for n in segments]).unsqueeze(0),
        cu_seqlens=torch.tensor([0, *segments], device=device).cumsum(0).to(torch.int32),
        max_seqlen=max(segments), rows=list(rows), lengths=row_lengths,
    )  # fmt: skip


def packed_microbatches(
    values: dict[str, torch.Tensor], lengths: Sequence[int], max_tokens: int, equal_shapes: bool
) -> list[PackedMicrobatch]:
    """The rows of ``values`` in packed microbatches of at most ``max_tokens`` tokens; ``equal_shapes``
    pads every one to the longest (a pipeline's stages exchange activations of one shape)."""
    plan = plan_packs(lengths, max_tokens)
    pad_to = max(sum(lengths[row] for row in rows) for rows in plan) if equal_shapes else 0
    return [pack_fields(values, rows, lengths, pad_to) for rows in plan]


def padding_share(packs: Sequence[PackedMicrobatch]) -> float:
    """Share of the processed tokens that are padding."""
    processed = sum(pack.num_tokens for pack in packs)
    return 1.0 - sum(sum(pack.lengths) for pack in packs) / max(processed, 1)


def unpack_rows(
    outputs: Sequence[dict[str, torch.Tensor]],
    packs: Sequence[PackedMicrobatch],
    num_rows: int,
    seq_length: int,
) -> dict[str, torch.Tensor]:
    """Per-token results ``[1, T, ...]`` of each packed microbatch back into padded rows
    ``[num_rows, seq_length, ...]``; positions past a sequence's end are zero."""
    result = {
        name: value.new_zeros((num_rows, seq_length, *value.shape[2:])) for name, value in outputs[0].items()
    }
    for output, pack in zip(outputs, packs, strict=True):
        offset = 0
        for row, length in zip(pack.rows, pack.lengths, strict=True):
            for name, value in output.items():
                result[name][row, :length] = value[0, offset : offset + length]
            offset += length
    return result


def _per_token_fields(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """Every ``[N, S, ...]`` field the batch has, and its labels."""
    values = {f.name: getattr(batch, f.name) for f in fields(batch) if f.name != "sample_ids"}
    return {**{name: value for name, value in values.items() if value is not None}, "labels": batch.labels}


def packed_rollout_microbatches(
    batch: RolloutBatch, max_tokens: int, equal_shapes: bool
) -> list[tuple[RolloutBatch, torch.Tensor, PackedMicrobatch]]:
    """``batch``'s rows as packed microbatches: for each, the packed ``RolloutBatch`` ``[1, T]``, its
    labels ``[1, T]`` (each sequence's own, so 0 after its last token, as unpacked) and the packing."""
    packs = packed_microbatches(_per_token_fields(batch), sequence_lengths(batch), max_tokens, equal_shapes)
    out = []
    for pack in packs:
        values = dict(pack.fields)
        labels = values.pop("labels")
        # One row, whose "sample id" is its first sequence's: nothing after packing reads it (the trust
        # mask was drawn on the padded rows, keyed by each sequence's own id).
        packed = replace(batch, **values, sample_ids=batch.sample_ids[pack.rows[:1]])
        out.append((packed, labels, pack))
    return out
