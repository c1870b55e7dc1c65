"""Loss helpers the tests use to check the library's normalisation against a direct computation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_tropd.config import MethodConfig
from megatron_tropd.losses import MethodContext, TokenSignals, method_context, token_loss, token_metrics


def make_method_context(
    config: MethodConfig,
    signals: TokenSignals,
    step: int,
    total_steps: int,
    dp_group: dist.ProcessGroup | None = None,
    guidance: bool | None = None,
) -> MethodContext:
    """Build the context of one rollout batch; ``signals`` are this rank's tokens of the whole batch."""
    return method_context(
        config, signals.entropy_student_old, signals.student_token_mask, step, total_steps, dp_group,
        guidance=guidance,
    )  # fmt: skip


def count_valid_tokens(loss_mask: torch.Tensor, dp_group: dist.ProcessGroup | None = None) -> int:
    """Loss-bearing tokens of the global batch: this rank's tokens (all microbatches) summed over DP."""
    count = loss_mask.sum().to(torch.int64).reshape(1)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(count, group=dp_group)
    return int(count.item())


def microbatch_loss(
    signals: TokenSignals, config: MethodConfig, context: MethodContext, global_valid_tokens: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum(loss * mask) / global_valid_tokens`` and the microbatch's metrics.

    Dividing by the global count (``count_valid_tokens`` over the whole batch and DP group) instead of
    the microbatch's own count makes the sum over microbatches and DP ranks equal the token-mean loss of
    the whole batch, so gradient accumulation and DP size do not change the update.
    """
    if global_valid_tokens < signals.loss_mask.sum().item():
        raise ValueError(
            f"global_valid_tokens = {global_valid_tokens} is smaller than this microbatch's own "
            f"{int(signals.loss_mask.sum())} valid tokens; pass the count over the whole global batch"
        )
    result = token_loss(signals, config, context)
    loss = result.loss.sum() / max(global_valid_tokens, 1)
    return loss, token_metrics(signals, result, config)
