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

Continuous batching (``forward_slots``) gives every row (slot) its own positions. A step's tokens (one
segment per slot: a prefill chunk or a decode token, ``SlotStep``) are packed into one sequence, so the
linear layers see only real tokens; RoPE rotates each token at its own position and its key and value
are written at (slot, position). The decode tokens attend in one batch over every slot's cache, with a
mask that hides each slot's positions past its own query (never written, or left by the slot's previous
request); each prefill chunk attends causally over its own slot's cache.

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

    def rotate(self, t: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """RoPE on ``t [s, b, ..., d]`` at positions ``start .. start + s - 1`` (``start`` an int), or at
        the position of each of the ``s`` rows (``start`` a ``[s]`` int64 tensor: packed slots' tokens)."""
        length = t.shape[0]
        shape = (length,) + (1,) * (t.dim() - 2) + (self.dims,)
        rows = slice(start, start + length) if isinstance(start, int) else start
        cos = self.cos[rows].view(shape)
        sin = self.sin[rows].view(shape)
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


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens of one slot's sequence, fed in one continuous-batching step: a chunk of the
    slot's prompt + prefix, or the one token it sampled last."""

    slot: int
    start: int
    """Position of the first token; the slot's cache already holds positions ``0 .. start - 1``."""
    token_ids: tuple[int, ...]
    sample_id: int
    samples: bool
    """The last token's logits draw the slot's next token (False for a prefill chunk with more to come)."""

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def _int64(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _single_mask(singles: list[Segment], num_slots: int, every_slot: bool, device: torch.device):
    """``(single_length, single_mask)`` of ``SlotStep`` for its one-token segments ``singles``."""
    # A slot without a one-token segment gets query position 0: its row is computed and dropped, and
    # key 0 keeps that row's softmax finite.
    query_positions = [0] * num_slots
    for segment in singles:
        query_positions[segment.slot] = segment.start
    length = max(query_positions) + 1
    if not singles or (every_slot and len(set(query_positions)) == 1):
        return length, None
    keys = torch.arange(length, device=device)
    mask = keys.unsqueeze(0) <= _int64(query_positions, device).unsqueeze(1)  # [B, L]
    return length, mask.view(num_slots, 1, 1, length)


@dataclass
class SlotStep:
    """One continuous-batching step: every segment's tokens packed into one sequence of ``T`` tokens.

    The one-token segments (decode tokens) come first, then the longer ones (prefill chunks), each group
    in slot order. Linear layers see ``T`` rows whatever the mix; attention runs the one-token segments
    as one batch over every slot's cache and each longer segment against its own slot's cache.
    """

    tokens: torch.Tensor  # [1, T] int64: one packed sequence, the embedding's [b, s] with b = 1
    positions: torch.Tensor  # [T] int64: each token's position in its slot's sequence
    slots: torch.Tensor  # [T] int64
    num_single: int
    """Tokens ``0 .. num_single - 1`` are the one-token segments."""
    single_slots: torch.Tensor | None  # [num_single] int64; None when they are slots 0 .. B-1 in order
    single_length: int
    """Cache positions the one-token segments attend over: one past the largest of their positions."""
    single_mask: torch.Tensor | None
    """``[B, 1, 1, single_length]`` bool, True where a slot's query may see the key: its own positions
    up to its query's; hides positions not yet written and what an earlier request left in the slot.
    None when every slot decodes at the same position (nothing to hide)."""
    chunks: list[Segment]
    """The longer segments, in token order after the one-token ones."""
    sample_rows: torch.Tensor  # [n] int64: tokens whose logits draw a token
    sample_slots: list[int]
    """The slot of each drawn token, in the order of ``sample_rows``."""
    sample_ids: torch.Tensor  # [n] int64
    sample_positions: torch.Tensor  # [n] int64: the position each drawn token will take

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def build(cls, segments: list[Segment], num_slots: int, device: torch.device) -> SlotStep:
        singles = [segment for segment in segments if len(segment.token_ids) == 1]
        chunks = [segment for segment in segments if len(segment.token_ids) > 1]
        tokens, positions, slots, sample_rows, sampling = [], [], [], [], []
        for segment in singles + chunks:
            tokens.extend(segment.token_ids)
            positions.extend(range(segment.start, segment.end))
            slots.extend([segment.slot] * len(segment.token_ids))
            if segment.samples:
                sample_rows.append(len(tokens) - 1)
                sampling.append(segment)
        single_slots = [segment.slot for segment in singles]
        every_slot = single_slots == list(range(num_slots))
        single_length, single_mask = _single_mask(singles, num_slots, every_slot, device)
        return cls(
            tokens=_int64(tokens, device).unsqueeze(0),
            positions=_int64(positions, device),
            slots=_int64(slots, device),
            num_single=len(singles),
            single_slots=None if every_slot else _int64(single_slots, device),
            single_length=single_length,
            single_mask=single_mask,
            chunks=chunks,
            sample_rows=_int64(sample_rows, device),
            sample_slots=[segment.slot for segment in sampling],
            sample_ids=_int64([segment.sample_id for segment in sampling], device),
            sample_positions=_int64([segment.end for segment in sampling], device),
        )


# ---------------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------------


class CachedDecoder:
    """One model stage's decode state for a batch of ``batch_size`` rows (slots), two ways to feed it:

    * ``forward`` (static batching): the next ``s`` positions of every row at once, one position counter
      shared by the batch; every call extends the cache by the positions it was given.
    * ``forward_slots`` (continuous batching): a ``SlotStep`` whose tokens sit at each slot's own
      positions; the caller tracks each slot's length, and a slot may start a new sequence at position 0.

    ``max_length`` is the longest sequence a row will hold (prompt + prefix + generation).
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
        # Zeros, not empty: a slot step's attention reads (masked) positions no token has written yet, and a
        # NaN bit pattern there would survive the mask (softmax weight 0 times NaN value is NaN).
        self.keys = torch.zeros(shape, dtype=config.params_dtype, device=device)
        self.values = torch.zeros(shape, dtype=config.params_dtype, device=device)

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

    @torch.no_grad()
    def forward_slots(self, step: SlotStep, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage on one continuous-batching step.

        The first stage embeds ``step.tokens``; later stages take ``hidden [T, 1, h]`` from the stage
        before. Each token's key and value go to its slot's cache at its position. Returns the gathered
        logits ``[n, V_padded]`` of ``step.sample_rows`` on the last stage, else the hidden states
        ``[T, 1, h]`` to send on.
        """
        if hidden is None:
            hidden = self.model.embedding(input_ids=step.tokens, position_ids=step.positions.unsqueeze(0))
        device = hidden.device
        chunk_masks = [_causal_mask(c.start, len(c.token_ids), self.per_group, device) for c in step.chunks]
        for index, weights in enumerate(self.weights):
            hidden = hidden + self._slot_attention(index, weights, hidden, step, chunk_masks)
            hidden = hidden + self._mlp(weights, hidden)
        if not self.model.post_process:
            return hidden
        return self._logits(hidden[step.sample_rows, 0])

    def _slot_attention(
        self, index: int, weights: _LayerWeights, hidden: torch.Tensor, step: SlotStep, chunk_masks: list
    ) -> torch.Tensor:
        query, key, value = self._qkv(weights, hidden)  # batch dim 1: the packed tokens
        query = self.rope.rotate(query, step.positions)[:, 0]  # [T, g, j, d]
        self.keys[index, step.slots, :, step.positions] = self.rope.rotate(key, step.positions)[:, 0]
        self.values[index, step.slots, :, step.positions] = value[:, 0]
        outputs = []
        if step.num_single:
            outputs.append(self._single_attention(index, query[: step.num_single], step))
        offset = step.num_single
        for chunk, mask in zip(step.chunks, chunk_masks, strict=True):
            end = offset + len(chunk.token_ids)
            outputs.append(self._chunk_attention(index, query[offset:end], chunk, mask))
            offset = end
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # [T, heads * d]
        return self._reduce(_linear(out.unsqueeze(1), weights.proj))

    def _single_attention(self, index: int, query: torch.Tensor, step: SlotStep) -> torch.Tensor:
        """``query [n, g, j, d]`` of the one-token segments -> ``[n, heads * d]``, one batch over the
        slots: a group's ``j`` query heads stand in SDPA's sequence dim against the group's keys."""
        rows = query
        if step.single_slots is not None:  # scatter into every slot's row: the cache is not copied
            shape = (self.keys.shape[1],) + query.shape[1:]
            rows = query.new_zeros(shape).index_copy_(0, step.single_slots, query)
        keys = self.keys[index, :, :, : step.single_length]
        values = self.values[index, :, :, : step.single_length]
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=step.single_mask, scale=self.scale)
        if step.single_slots is not None:
            out = out.index_select(0, step.single_slots)
        return out.reshape(query.shape[0], -1)

    def _chunk_attention(
        self, index: int, query: torch.Tensor, chunk: Segment, mask: torch.Tensor
    ) -> torch.Tensor:
        """``query [c, g, j, d]`` of one slot's prefill chunk, causal over that slot's cache ->
        ``[c, heads * d]``."""
        length = query.shape[0]
        rows = query.permute(1, 2, 0, 3).reshape(1, self.groups, self.per_group * length, self.dims)
        keys = self.keys[index, chunk.slot : chunk.slot + 1, :, : chunk.end]
        values = self.values[index, chunk.slot : chunk.slot + 1, :, : chunk.end]
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(self.groups, self.per_group, length, self.dims).permute(2, 0, 1, 3)
        return out.reshape(length, -1)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.epsilon)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the TP group (Megatron's all-reduce)."""
        if self.tp_size > 1:
            partial = partial.contiguous()  # a CPU ``_linear`` returns a transposed view
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _qkv(self, weights: _LayerWeights, hidden: torch.Tensor):
        """Queries ``[s, b, g, j, d]``, keys and values ``[s, b, g, d]`` of ``hidden [s, b, h]`` (q/k norms
        applied, RoPE not yet)."""
        length, batch, _ = hidden.shape
        per_group = self.per_group
        mixed = _linear(self._norm(hidden, weights.input_norm), weights.qkv, weights.qkv_bias)
        mixed = mixed.view(length, batch, self.groups, per_group + 2, self.dims)
        query, key, value = mixed[..., :per_group, :], mixed[..., per_group, :], mixed[..., per_group + 1, :]
        if weights.q_norm is not None:
            query = self._norm(query, weights.q_norm)
            key = self._norm(key, weights.k_norm)
        return query, key, value

    def _attention(
        self, index: int, weights: _LayerWeights, hidden: torch.Tensor, start: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        length, batch, _ = hidden.shape
        per_group = self.per_group
        query, key, value = self._qkv(weights, hidden)
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
