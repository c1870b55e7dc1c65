"""The reference every generation test compares against: a full forward of whole sequences, no KV cache."""

from __future__ import annotations

import torch
import torch.distributed as dist


def full_logits(model, groups, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, V_padded]`` logits of a full forward (no cache) on every rank: the reference."""
    batch, length = tokens.shape
    position_ids = torch.arange(length).expand(batch, length)
    if not groups.is_first_stage:
        hidden = torch.empty(length, batch, model.config.hidden_size)
        dist.recv(hidden, src=groups.pipeline_ranks[groups.position.pp_rank - 1], group=groups.pp_group)
        model.set_input_tensor(hidden)
    output = model(tokens, position_ids, None)
    if groups.is_last_stage:
        shards = [torch.empty_like(output) for _ in range(groups.layout.tensor_parallel)]
        dist.all_gather(shards, output.contiguous(), group=groups.tp_group)
        logits = torch.cat(shards, dim=-1)
    else:
        dist.send(
            output.contiguous(), dst=groups.pipeline_ranks[groups.position.pp_rank + 1], group=groups.pp_group
        )
        logits = None
    if groups.layout.pipeline_parallel > 1:
        shape = torch.zeros(3, dtype=torch.int64) if logits is None else torch.tensor(logits.shape)
        dist.broadcast(shape, src=groups.pipeline_ranks[-1], group=groups.pp_group)
        logits = torch.empty(*shape.tolist()) if logits is None else logits
        dist.broadcast(logits, src=groups.pipeline_ranks[-1], group=groups.pp_group)
    return logits


def right_padded(rows: list[list[int]]) -> torch.Tensor:
    """``[b, max_len]``: causal logits at a row's positions do not depend on the padding after it."""
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens
