"""Incremental decoding over a Megatron-Core ``GPTModel``'s own parameters, keys rotated once into the cache.

Why not ``GPTModel.forward`` with a ``StaticInferenceContext``: in Megatron-Core 0.16 every decode step
re-applies RoPE to every cached key, expands the GQA keys and values with ``repeat_interleave``, and goes
through a stack of module and autograd-function wrappers per linear layer; on rollout-sized batches that
overhead, not the matrix multiplies, sets the speed (``bench/generation.py``).

This decoder reads the model's own parameter tensors (references, never copies, so the weights the
optimizer updates in place are the ones it decodes with) and runs the dense pre-norm decoder directly:
RMSNorm, the fused QKV projection in Megatron's per-group layout ``[q_1 .. q_n, k, v]``, optional q/k
norms, RoPE with cos/sin from the model's own ``rotary_pos_emb``, attention in which a group's query heads
share their key/value head by a reshape (no copy), and the SwiGLU MLP. A key is rotated once, when it
enters the cache. Under tensor parallelism each rank holds Megatron's shards: the attention output and the
MLP output are summed over the TP group (Megatron's row-parallel all-reduce) and the logits gathered. The
embedding lookup goes through the model's own embedding module. Pipeline stages run their own layers;
the engine hands hidden states between them.

``unsupported_reason`` names what this decoder cannot reproduce (MoE, MLA, sequence or context
parallelism, ...); for those models the engine falls back to Megatron's forward. Layer specs: Megatron's
local layers and Transformer-Engine layers (whose QKV and FC1 carry the preceding norm's weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _config_reasons(config) -> list[str]:
    """Transformer-config features the decoder does not implement (empty when it can run the model)."""
    unsupported = {
        "multi_latent_attention": "multi-latent attention",
        "rotary_interleaved": "interleaved RoPE",
        "sequence_parallel": "sequence parallelism",
        "num_moe_experts": "mixture-of-experts layers",
        "apply_residual_connection_post_layernorm": "post-norm residuals",
        "fp32_residual_connection": "an fp32 residual stream",
        "attention_output_gate": "gated attention",
        "window_size": "sliding-window attention",
        "add_bias_linear": "biases on the dense linear layers",
        "layernorm_zero_centered_gamma": "zero-centred norm weights",
        "fp8": "FP8 linear layers",
        "fp4": "FP4 linear layers",
    }
    reasons = [name for attribute, name in unsupported.items() if getattr(config, attribute, None)]
    checks = {
        "context parallelism": getattr(config, "context_parallel_size", 1) == 1,
        "attention sinks": getattr(config, "softmax_type", "vanilla") == "vanilla",
        "a norm other than RMSNorm": config.normalization == "RMSNorm",
        "an MLP other than SwiGLU": config.gated_linear_unit and config.activation_func is F.silu,
        "fewer query groups than tensor-parallel ranks": (
            config.num_query_groups or config.num_attention_heads
        )
        % config.tensor_model_parallel_size
        == 0,
    }
    return reasons + [name for name, ok in checks.items() if not ok]


def _layer_reasons(layer: torch.nn.Module) -> list[str]:
    """Layer structure the decoder does not implement."""
    attention = getattr(layer, "self_attention", None)
    if attention is None or not hasattr(attention, "linear_qkv"):
        return ["a layer without standard self-attention"]
    reasons = []
    try:
        _LayerWeights.of(layer)
    except AttributeError as error:  # a layer layout other than Megatron's local or TE spec
        reasons.append(f"a layer whose parameters are not where the decoder reads them ({error})")
    if type(getattr(layer, "mlp", None)).__name__ != "MLP":
        reasons.append("a non-dense MLP")
    if type(getattr(layer, "cross_attention", None)).__name__ not in ("IdentityOp", "NoneType"):
        reasons.append("cross-attention")
    return reasons


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``CachedDecoder`` cannot run ``model`` exactly, or None when it can."""
    model = _base_model(model)
    if getattr(model, "position_embedding_type", None) != "rope":
        return "positions are not rotary (RoPE)"
    if type(getattr(model, "rotary_pos_emb", None)).__name__ != "RotaryEmbedding":
        return "a RoPE variant other than Megatron's RotaryEmbedding"
    reasons = _config_reasons(model.config)
    for layer in model.decoder.layers:
        reasons += [r for r in _layer_reasons(layer) if r not in reasons]
    return ", ".join(reasons) or None


# ---------------------------------------------------------------------------------------------------------
# Parameters, read from the model's modules
# ---------------------------------------------------------------------------------------------------------


def _norm_weight(norm: torch.nn.Module, fused_into: torch.nn.Module) -> torch.Tensor:
    """A pre-norm's weight: the norm module's own (local layers), or the one Transformer-Engine keeps on
    the linear layer the norm is fused into (the norm module is then an identity)."""
    weight = getattr(norm, "weight", None)
    return weight if weight is not None else fused_into.layer_norm_weight


def _bias(linear: torch.nn.Module) -> torch.Tensor | None:
    """A linear layer's bias, or None; Transformer-Engine keeps an empty tensor where there is none."""
    bias = getattr(linear, "bias", None)
    return bias if bias is not None and bias.numel() > 0 else None


@dataclass
class _LayerWeights:
    """One layer's parameter tensors (this rank's TP shards)."""

    input_norm: torch.Tensor  # [h]
    qkv: torch.Tensor  # [groups * (per_group + 2) * d, h]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [d]
    k_norm: torch.Tensor | None
    proj: torch.Tensor  # [h, heads * d]
    mlp_norm: torch.Tensor  # [h]
    fc1: torch.Tensor  # [2 * ffn, h]: [gate; up]
    fc2: torch.Tensor  # [h, ffn]

    @classmethod
    def of(cls, layer: torch.nn.Module) -> _LayerWeights:
        attention, mlp = layer.self_attention, layer.mlp
        return cls(
            input_norm=_norm_weight(layer.input_layernorm, attention.linear_qkv),
            qkv=attention.linear_qkv.weight,
            qkv_bias=_bias(attention.linear_qkv),
            q_norm=getattr(attention.q_layernorm, "weight", None),
            k_norm=getattr(attention.k_layernorm, "weight", None),
            proj=attention.linear_proj.weight,
            mlp_norm=_norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1),
            fc1=mlp.linear_fc1.weight,
            fc2=mlp.linear_fc2.weight,
        )


class _Rope:
    """cos/sin of every position of a batch, cast to the activations' dtype as Megatron does."""

    def __init__(self, model: torch.nn.Module, max_length: int, dtype: torch.dtype, device: torch.device):
        freqs = model.rotary_pos_emb(max_length).to(device).reshape(max_length, -1)  # [S, rot], fp32
        self.dims = freqs.shape[-1]
        half = self.dims // 2
        # rotate_half(t) = cat(-t2, t1); folding the sign into sin leaves cat(t2, t1) per call.
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
        self.cos = torch.cos(freqs).to(dtype)
        self.sin = (torch.sin(freqs) * sign).to(dtype)

    def rotate(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE on ``t [s, b, ..., d]`` at positions ``start .. start + s - 1``."""
        length = t.shape[0]
        shape = (length,) + (1,) * (t.dim() - 2) + (self.dims,)
        cos = self.cos[start : start + length].view(shape)
        sin = self.sin[start : start + length].view(shape)
        rotary, passed = t[..., : self.dims], t[..., self.dims :]
        first, second = rotary.chunk(2, dim=-1)
        rotated = rotary * cos + torch.cat((second, first), dim=-1) * sin
        return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` for ``x [..., in]`` and ``weight [out, in]``, as ``F.linear``.

    On a CPU the product is computed as ``(weight @ x^T)^T``: for the few rows a decode step has, MKL's
    kernel for ``x @ W^T`` streams the weight at about half the bandwidth ``W @ x^T`` gets (8 x 256 x
    32,000 on 2 cores: 10.1 vs 4.7 ms; the same gap on the layers' weights once the output layer has
    evicted them from cache), and streaming weights is most of a decode step.
    """
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.t()).t().reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _causal_mask(start: int, length: int, per_group: int, device: torch.device) -> torch.Tensor | None:
    """``[per_group * s, start + s]`` bool for a multi-position call; None for one position (it sees every
    cached key). Row ``j * s + i`` is query position ``start + i``, for each head ``j`` of the group."""
    if length == 1:
        return None
    query_positions = torch.arange(start, start + length, device=device).repeat(per_group)
    key_positions = torch.arange(start + length, device=device)
    return key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------------


class CachedDecoder:
    """One model stage's decode state for one batch: feed tokens (or the previous stage's hidden states)
    position by position; every call extends the cache by the positions it was given.

    ``max_length`` is the longest sequence of the batch (prompt + prefix + generation).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int, device: torch.device):
        self.model = _base_model(model)
        config = self.model.config
        self.weights = [_LayerWeights.of(layer) for layer in self.model.decoder.layers]
        self.tp_group = self.model.pg_collection.tp
        self.tp_size = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // self.tp_size
        self.groups = (config.num_query_groups or config.num_attention_heads) // self.tp_size
        self.per_group = self.heads // self.groups  # query heads sharing one key/value head
        self.dims = config.kv_channels
        self.epsilon = config.layernorm_epsilon
        self.scale = config.softmax_scale or 1.0 / math.sqrt(self.dims)
        self.max_length = max_length
        self.length = 0  # positions already in the cache
        self.rope = _Rope(self.model, max_length, config.params_dtype, device)
        self.positions = torch.arange(max_length, device=device).expand(batch_size, max_length)
        shape = (len(self.weights), batch_size, self.groups, max_length, self.dims)
        self.keys = torch.empty(shape, dtype=config.params_dtype, device=device)
        self.values = torch.empty(shape, dtype=config.params_dtype, device=device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage on the next ``s`` positions.

        ``tokens [b, s]`` feed the first stage; later stages pass ``hidden [s, b, h]`` from the stage
        before. Returns the last position's gathered logits ``[b, V_padded]`` on the last stage, else
        the hidden states ``[s, b, h]`` to send on.
        """
        start, length = self.length, tokens.shape[1]
        if start + length > self.max_length:
            raise ValueError(f"{start + length} positions exceed the decoder's max_length {self.max_length}")
        if hidden is None:
            positions = self.positions[:, start : start + length]
            hidden = self.model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        mask = _causal_mask(start, length, self.per_group, hidden.device)  # the same for every layer
        for index, weights in enumerate(self.weights):
            hidden = hidden + self._attention(index, weights, hidden, start, mask)
            hidden = hidden + self._mlp(weights, hidden)
        self.length += length
        return self._logits(hidden[-1]) if self.model.post_process else hidden

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.epsilon)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the TP group (Megatron's all-reduce)."""
        if self.tp_size > 1:
            partial = partial.contiguous()  # a CPU ``_linear`` returns a transposed view
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _attention(
        self, index: int, weights: _LayerWeights, hidden: torch.Tensor, start: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        length, batch, _ = hidden.shape
        per_group = self.per_group
        mixed = _linear(self._norm(hidden, weights.input_norm), weights.qkv, weights.qkv_bias)
        mixed = mixed.view(length, batch, self.groups, per_group + 2, self.dims)
        query, key, value = mixed[..., :per_group, :], mixed[..., per_group, :], mixed[..., per_group + 1, :]
        if weights.q_norm is not None:
            query = self._norm(query, weights.q_norm)
            key = self._norm(key, weights.k_norm)
        end = start + length
        self.keys[index, :, :, start:end] = self.rope.rotate(key, start).permute(1, 2, 0, 3)
        self.values[index, :, :, start:end] = value.permute(1, 2, 0, 3)
        # [s, b, g, j, d] -> [b, g, j * s, d]: a group's query heads all attend to its one key/value head.
        rows = self.rope.rotate(query, start).permute(1, 2, 3, 0, 4)
        rows = rows.reshape(batch, self.groups, per_group * length, self.dims)
        keys, values = self.keys[index, :, :, :end], self.values[index, :, :, :end]
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(batch, self.groups, per_group, length, self.dims).permute(3, 0, 1, 2, 4)
        return self._reduce(_linear(out.reshape(length, batch, -1), weights.proj))

    def _mlp(self, weights: _LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = _linear(self._norm(hidden, weights.mlp_norm), weights.fc1).chunk(2, dim=-1)
        return self._reduce(_linear(F.silu(gate) * up, weights.fc2))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last position's ``[b, h]`` -> gathered logits ``[b, V_padded]`` (final norm, output layer)."""
        final_norm = getattr(self.model.decoder, "final_layernorm", None)
        if final_norm is not None:
            hidden = self._norm(hidden, final_norm.weight)
        weight = self.model.output_layer.weight
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        logits = _linear(hidden, weight)  # [b, V_padded / tp]
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(shards, logits.contiguous(), group=self.tp_group)
        return torch.cat(shards, dim=-1)
