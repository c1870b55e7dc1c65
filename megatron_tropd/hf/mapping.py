"""Declarative HF <-> Megatron tensor mapping tables: an architecture is a table, not a code path.

Each ``TensorMapping`` row says which Hugging Face tensors (names with a ``{layer}`` placeholder for per-layer
tensors) make up one Megatron-Core global checkpoint tensor (the key ``sharded_parameters`` reports, with the
layer as its prepended axis), and which ``Transform`` turns one into the other. The Megatron side is always
the *global*, unsharded tensor: each rank then copies the window its ``ShardedTensor`` describes, so one table
serves every TP/PP layout.

Megatron's global layouts that the transforms produce:

- fused QKV ``[groups * (heads_per_group + 2) * d, hidden]``: per KV group ``[q_g (heads_per_group * d rows);
  k_g (d); v_g (d)]``, groups in order (TP ranks own contiguous groups). Biases the same without ``hidden``.
- SwiGLU fc1 ``[2 * ffn, hidden]`` = ``[gate; up]`` (Megatron describes a TP rank's ``[gate_r; up_r]`` as two
  windows of it).
- embedding / LM head ``[padded_vocab, hidden]``: the true vocabulary then zero rows (padding grows with TP).

Torch-only: no Megatron import, so the tables can be read and tested cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_tropd.model_config import ARCHITECTURES, ModelConfig

__all__ = [
    "IGNORED_HF_SUFFIXES",
    "MAPPINGS",
    "TRANSFORMS",
    "TensorMapping",
    "Transform",
    "expected_hf_names",
    "expected_hf_shapes",
    "hf_names",
    "mappings_for",
    "megatron_from_hf",
    "hf_from_megatron",
]

ToMegatron = Callable[[Sequence[torch.Tensor], ModelConfig, tuple[int, ...]], torch.Tensor]
ToHf = Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


@dataclass(frozen=True)
class Transform:
    """A pair of inverse functions between a list of HF tensors and one global Megatron tensor."""

    to_megatron: ToMegatron
    """``(hf_tensors, config, megatron_global_shape) -> megatron tensor``."""
    to_hf: ToHf
    """``(megatron tensor, config) -> hf_tensors`` in the order of the mapping's ``hf_names``."""


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron global tensor and the HF tensors it is made of."""

    megatron_key: str
    """Global checkpoint key (per-layer keys have the layer as their first, prepended axis)."""
    hf_names: tuple[str, ...]
    """HF tensor names; ``{layer}`` stands for the global layer index."""
    transform: str
    """Key into ``TRANSFORMS``."""
    untied_only: bool = False
    """Present only when the LM head is not tied to the embedding (HF then has no ``lm_head.weight``)."""

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_names[0]


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


def _copy_to_megatron(hf: Sequence[torch.Tensor], config: ModelConfig, shape: tuple[int, ...]):
    (tensor,) = hf
    return tensor


def _copy_to_hf(tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    return [tensor]


def _pad_vocab(hf: Sequence[torch.Tensor], config: ModelConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """Append zero rows up to Megatron's padded vocabulary (``shape[0]``, which depends on TP)."""
    (tensor,) = hf
    assert tensor.shape[0] <= shape[0], f"{tensor.shape[0]} vocab rows > padded {shape[0]}"
    padding = tensor.new_zeros((shape[0] - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def _unpad_vocab(tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    return [tensor[: config.vocab_size]]


def _qkv_rows(config: ModelConfig) -> tuple[int, int, int]:
    """(query rows, key rows, value rows) of one KV group."""
    heads_per_group = config.num_attention_heads // config.num_query_groups
    return heads_per_group * config.kv_channels, config.kv_channels, config.kv_channels


def _interleave_qkv(hf: Sequence[torch.Tensor], config: ModelConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """HF q, k, v (weights ``[rows, hidden]`` or biases ``[rows]``) -> Megatron's per-group fused QKV."""
    groups = config.num_query_groups
    per_group = [t.reshape(groups, -1, *t.shape[1:]) for t in hf]  # [groups, rows_per_group, (hidden)]
    fused = torch.cat(per_group, dim=1)
    return fused.reshape(-1, *fused.shape[2:])


def _split_qkv(tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """Inverse of ``_interleave_qkv``: Megatron's fused QKV -> HF q, k, v."""
    rows = _qkv_rows(config)
    per_group = tensor.reshape(config.num_query_groups, sum(rows), *tensor.shape[1:])
    return [part.reshape(-1, *tensor.shape[1:]) for part in per_group.split(rows, dim=1)]


def _concat_gate_up(hf: Sequence[torch.Tensor], config: ModelConfig, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(list(hf))  # [gate; up]: silu(gate) * up


def _split_gate_up(tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    return list(tensor.split(config.ffn_hidden_size))


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(_copy_to_megatron, _copy_to_hf),
    "vocab": Transform(_pad_vocab, _unpad_vocab),
    "qkv": Transform(_interleave_qkv, _split_qkv),
    "gate_up": Transform(_concat_gate_up, _split_gate_up),
}


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------

_LAYER = "model.layers.{layer}."
_ATTN, _MLP = "decoder.layers.self_attention.", "decoder.layers.mlp."

_COMMON = (
    TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    # Megatron keys the input / pre-MLP RMSNorms as fused into the next linear (TE's layout, also used by the
    # local spec's checkpoint keys), so the same checkpoint loads with and without Transformer Engine.
    TensorMapping(_ATTN + "linear_qkv.layer_norm_weight", (_LAYER + "input_layernorm.weight",), "copy"),
    TensorMapping(
        _ATTN + "linear_qkv.weight",
        tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    TensorMapping(_ATTN + "linear_proj.weight", (_LAYER + "self_attn.o_proj.weight",), "copy"),
    TensorMapping(
        _MLP + "linear_fc1.layer_norm_weight", (_LAYER + "post_attention_layernorm.weight",), "copy"
    ),
    TensorMapping(
        _MLP + "linear_fc1.weight",
        (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"),
        "gate_up",
    ),
    TensorMapping(_MLP + "linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",), "copy"),
    TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    TensorMapping("output_layer.weight", ("lm_head.weight",), "vocab", untied_only=True),
)
_QKV_BIAS = (
    TensorMapping(
        _ATTN + "linear_qkv.bias", tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"
    ),
)
_QK_NORM = (
    TensorMapping(_ATTN + "q_layernorm.weight", (_LAYER + "self_attn.q_norm.weight",), "copy"),
    TensorMapping(_ATTN + "k_layernorm.weight", (_LAYER + "self_attn.k_norm.weight",), "copy"),
)

MAPPINGS: dict[str, tuple[TensorMapping, ...]] = {
    "qwen2": _COMMON + _QKV_BIAS,  # Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: q/k/v biases
    "qwen3": _COMMON + _QK_NORM,  # per-head RMSNorm on queries and keys
    "llama": _COMMON,
}
assert set(MAPPINGS) == set(ARCHITECTURES), "every architecture needs a mapping table"

# HF tensors that carry no weights of their own (buffers some old checkpoints saved).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def mappings_for(config: ModelConfig) -> tuple[TensorMapping, ...]:
    """The rows that apply to ``config``: its architecture's table, without the LM head when tied."""
    if config.architecture not in MAPPINGS:
        raise ValueError(
            f"no HF mapping for architecture {config.architecture!r}; supported: {', '.join(MAPPINGS)}"
        )
    table = MAPPINGS[config.architecture]
    return tuple(m for m in table if not (m.untied_only and config.tie_word_embeddings))


def hf_names(mapping: TensorMapping, layer: int | None) -> list[str]:
    """The HF tensor names of ``mapping`` for global layer ``layer`` (None for non-layer tensors)."""
    assert (layer is not None) == mapping.per_layer, f"{mapping.megatron_key}: layer {layer}"
    return [name.format(layer=layer) for name in mapping.hf_names]


def expected_hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name a checkpoint of ``config`` must hold, in table order."""
    return list(expected_hf_shapes(config))


def _hf_shape_table(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name template -> the shape ``config`` implies for it (as transformers builds the model)."""
    hidden, head, ffn = config.hidden_size, config.kv_channels, config.ffn_hidden_size
    q_rows, kv_rows = config.num_attention_heads * head, config.num_query_groups * head
    attn, mlp = _LAYER + "self_attn.", _LAYER + "mlp."
    return {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "lm_head.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
        _LAYER + "input_layernorm.weight": (hidden,),
        _LAYER + "post_attention_layernorm.weight": (hidden,),
        attn + "q_proj.weight": (q_rows, hidden),
        attn + "k_proj.weight": (kv_rows, hidden),
        attn + "v_proj.weight": (kv_rows, hidden),
        attn + "q_proj.bias": (q_rows,),
        attn + "k_proj.bias": (kv_rows,),
        attn + "v_proj.bias": (kv_rows,),
        attn + "o_proj.weight": (hidden, q_rows),
        attn + "q_norm.weight": (head,),
        attn + "k_norm.weight": (head,),
        mlp + "gate_proj.weight": (ffn, hidden),
        mlp + "up_proj.weight": (ffn, hidden),
        mlp + "down_proj.weight": (hidden, ffn),
    }


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name a checkpoint of ``config`` must hold -> its shape, in table order."""
    table = _hf_shape_table(config)
    shapes = {}
    for mapping in mappings_for(config):
        layers = range(config.num_layers) if mapping.per_layer else [None]
        for layer in layers:
            for template, name in zip(mapping.hf_names, hf_names(mapping, layer), strict=True):
                shapes[name] = table[template]
    return shapes


def megatron_from_hf(
    mapping: TensorMapping, hf_tensors: Sequence[torch.Tensor], config: ModelConfig, shape: tuple[int, ...]
) -> torch.Tensor:
    """The global Megatron tensor of ``mapping`` (without the layer axis), checked against ``shape``."""
    try:
        tensor = TRANSFORMS[mapping.transform].to_megatron(hf_tensors, config, shape)
    except RuntimeError as exc:  # e.g. a q_proj whose rows do not split into the config's KV groups
        raise ValueError(
            f"HF tensors {list(mapping.hf_names)} of shapes {[tuple(t.shape) for t in hf_tensors]} do not "
            f"fit the model that config.json describes ({exc}): config.json and the weights disagree"
        ) from None
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"HF tensors {list(mapping.hf_names)} give {mapping.megatron_key} the shape "
            f"{tuple(tensor.shape)}, "
            f"but the model built from config.json needs {tuple(shape)}: config.json and the weights disagree"
        )
    return tensor


def hf_from_megatron(mapping: TensorMapping, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors (in ``hf_names`` order) of one global Megatron tensor."""
    return [t.contiguous() for t in TRANSFORMS[mapping.transform].to_hf(tensor, config)]
