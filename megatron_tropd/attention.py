"""Megatron's local (pure torch) attention, extended to packed THD sequences.

Transformer-Engine's attention runs packed sequences (``PackedSeqParams``, THD) natively. Megatron's
local ``DotProductAttention`` refuses them, so CPU runs and GPU runs without Transformer-Engine use
``PackedDotProductAttention``: given THD inputs it restores a one-row SBHD layout and masks attention to
be causal within each sequence and zero across sequences (a block-diagonal causal mask built from the
cumulative sequence lengths). Unpacked inputs go to Megatron's own code unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def block_causal_mask(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True where query ``i`` must not see key ``j`` (Megatron's mask convention):
    a later position, or a position of another sequence."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)  # [T]
    allowed = (segment.unsqueeze(1) == segment.unsqueeze(0)) & (
        positions.unsqueeze(0) <= positions.unsqueeze(1)
    )
    return (~allowed).view(1, 1, num_tokens, num_tokens)


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD packed sequences (see the module docstring)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must be THD; got qkv_format={packed_seq_params.qkv_format!r}")
        # THD [t, heads, d] -> SBHD [t, 1, heads, d]: one row holding every sequence of the pack.
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        out = super().forward(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type, attention_bias
        )
        return out.squeeze(1)  # [t, heads * d]; the attention layer restores [t, 1, h]
