"""Megatron-Core GPT models for the student and the teacher: shape config, construction, initialisation.

The student and the teacher are decoder-only LMs of the Qwen2/2.5, Qwen3 or Llama 3 family. ``ModelConfig``
describes one in Hugging Face terms (so a ``config.json`` maps onto it field by field); ``build_gpt_model``
turns it into a Megatron-Core ``GPTModel`` on the process groups it is given, so the teacher and the student
can use different tensor/pipeline-parallel layouts in one job. This module knows nothing about distillation.

``initialize_weights`` makes a model's values independent of its layout: every parameter's full, unsharded
tensor is drawn from a generator seeded by (seed, the parameter's global checkpoint key) and each rank copies
in its own slice, located through Megatron's ``sharded_state_dict`` (the same description dist-checkpointing
uses to reshard). The same seed therefore gives the same model at TP1, TP2, PP2 or TP2xPP2, which is what
every TP/PP-invariance test in the project stands on.

Megatron-Core is imported inside the functions that need it, so ``ModelConfig`` and its presets can be
imported and validated (by recipes, the command line) without paying megatron's ~4 s import.

Megatron-Core versions: written against 0.16.1 and read against 0.19.2. ``GPTModel``'s signature (including
``pg_collection``, ``rope_scaling`` and ``rope_scaling_factor``) is the same in both; 0.19 marks ``GPTModel``
deprecated in favour of ``HybridModel`` (it logs a warning per construction but works), and turns the layer
spec functions into ``(*args, **kwargs)`` wrappers, so we pass their arguments by keyword only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_tropd.platform import default_device

if TYPE_CHECKING:  # megatron is imported lazily at run time (see the module docstring)
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

__all__ = [
    "ARCHITECTURES",
    "HF_ARCHITECTURES",
    "Llama3RopeScaling",
    "ModelConfig",
    "build_gpt_model",
    "count_parameters",
    "initialize_weights",
    "llama3_8b",
    "model_flops_per_token",
    "padded_vocab_size",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen3_1_7b",
    "qwen3_4b",
    "tiny",
]

# HF ``architectures[0]`` -> our architecture tag (also HF's ``model_type``).
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
ARCHITECTURES = tuple(HF_ARCHITECTURES.values())
_HF_CLASS_OF = {tag: cls for cls, tag in HF_ARCHITECTURES.items()}

# Megatron-Core's RotaryEmbedding applies Llama-3 scaling with only ``factor`` configurable; these three are
# hard-coded defaults of ``RotaryEmbedding._apply_scaling`` (0.16.1 and 0.19.2 alike).
_MEGATRON_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Keys whose first axis is the (padded) vocabulary; the tied output layer on the last PP stage reuses the
# embedding key, so both stages draw the same rows.
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Output projections of each residual branch: Megatron scales their init std by 1/sqrt(2 * num_layers).
_RESIDUAL_OUTPUT_KEYS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _braced(values: list[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


@dataclass
class Llama3RopeScaling:
    """Llama-3 ("llama3" rope_type) frequency scaling of RoPE, in HF ``rope_scaling`` terms."""

    factor: float
    """Wavelengths above ``original_max_position_embeddings / low_freq_factor`` are stretched this much."""

    low_freq_factor: float = 1.0
    """Below the frequency ``low_freq_factor / original_max_position_embeddings`` scaling is full."""

    high_freq_factor: float = 4.0
    """Above the frequency ``high_freq_factor / original_max_position_embeddings`` there is no scaling."""

    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained at, before the extension."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        _require(
            _is_positive_number(self.factor) and self.factor >= 1,
            f"model.rope_scaling.factor must be >= 1 (the context-extension ratio); got {self.factor!r}",
        )
        _require(
            _is_positive_number(self.low_freq_factor),
            f"model.rope_scaling.low_freq_factor must be > 0; got {self.low_freq_factor!r}",
        )
        _require(
            _is_positive_number(self.high_freq_factor) and self.high_freq_factor > self.low_freq_factor,
            f"model.rope_scaling.high_freq_factor must exceed low_freq_factor={self.low_freq_factor} (the "
            f"smoothing band between them would be empty); got {self.high_freq_factor!r}",
        )
        _require(
            _is_positive_int(self.original_max_position_embeddings),
            "model.rope_scaling.original_max_position_embeddings must be an integer >= 1; got "
            f"{self.original_max_position_embeddings!r}",
        )


@dataclass
class ModelConfig:
    """Shape of a decoder-only LM (RMSNorm, SwiGLU, RoPE, GQA), named as in Hugging Face ``config.json``."""

    architecture: str
    """Family tag, one of ``ARCHITECTURES``: qwen2 (qkv bias), qwen3 (qk RMSNorm), llama (neither)."""

    num_layers: int
    """Transformer layers (HF ``num_hidden_layers``)."""

    hidden_size: int
    """Residual-stream width."""

    ffn_hidden_size: int
    """SwiGLU inner width (HF ``intermediate_size``); gate and up projections each have this many rows."""

    num_attention_heads: int
    """Query heads."""

    num_query_groups: int
    """Key/value heads shared by groups of query heads, GQA (HF ``num_key_value_heads``)."""

    vocab_size: int
    """True tokenizer vocabulary; the model's embedding is padded beyond it (``padded_vocab_size``)."""

    max_position_embeddings: int
    """Longest sequence the model is configured for."""

    rotary_base: float
    """RoPE base period theta (HF ``rope_theta``)."""

    norm_epsilon: float
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""

    head_dim: int | None = None
    """Per-head width; None means ``hidden_size // num_attention_heads`` (Qwen3-4B needs 128 != 2560/32)."""

    rope_scaling: Llama3RopeScaling | None = None
    """Llama-3 RoPE frequency scaling, or None for plain RoPE."""

    add_qkv_bias: bool = False
    """Bias on the q/k/v projections only (Qwen2/2.5 and the DeepSeek-R1-Distill-Qwen models)."""

    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""

    tie_word_embeddings: bool = False
    """The LM head reuses the input embedding matrix."""

    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times the tensor-parallel size."""

    init_method_std: float = 0.02
    """Std of the normal weight init (HF ``initializer_range``); residual outputs use std / sqrt(2 L)."""

    activation: str = "swiglu"
    """MLP activation; only SwiGLU (silu-gated) is supported."""

    normalization: str = "RMSNorm"
    """Normalisation layer; only RMSNorm is supported."""

    @property
    def kv_channels(self) -> int:
        """Per-head width actually used: ``head_dim`` or ``hidden_size // num_attention_heads``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what it accepts."""
        _require(
            self.architecture in ARCHITECTURES,
            f"model.architecture = {self.architecture!r} is not supported; choose one of: "
            f"{', '.join(ARCHITECTURES)}",
        )
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
        ):
            value = getattr(self, name)
            _require(_is_positive_int(value), f"model.{name} must be an integer >= 1; got {value!r}")
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            value = getattr(self, name)
            _require(_is_positive_number(value), f"model.{name} must be a finite number > 0; got {value!r}")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"model.num_query_groups={self.num_query_groups} (each KV head serves a group of query heads)",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: set model.head_dim",
            )
        else:
            _require(
                _is_positive_int(self.head_dim),
                f"model.head_dim must be an integer >= 1 or None; got {self.head_dim!r}",
            )
        _require(
            self.activation == "swiglu",
            f"model.activation = {self.activation!r}: only 'swiglu' is supported (Qwen2/Qwen3/Llama all "
            "use silu-gated MLPs)",
        )
        _require(
            self.normalization == "RMSNorm",
            f"model.normalization = {self.normalization!r}: only 'RMSNorm' is supported",
        )
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        self._validate_architecture_flags()

    def _validate_architecture_flags(self) -> None:
        """The tag decides the HF export class, so its defining flags must match it."""
        expected = {"qwen2": (True, False), "qwen3": (False, True), "llama": (False, False)}[
            self.architecture
        ]
        _require(
            (self.add_qkv_bias, self.qk_layernorm) == expected,
            f"model.architecture = {self.architecture!r} needs add_qkv_bias={expected[0]} and "
            f"qk_layernorm={expected[1]}; got {self.add_qkv_bias} and {self.qk_layernorm}: fix the flags "
            "or the architecture tag (tiny(architecture=...) sets them for you)",
        )

    def validate_parallel(self, tensor_parallel: int, pipeline_parallel: int) -> None:
        """Raise ``ValueError`` if the model cannot be split ``tensor_parallel`` x ``pipeline_parallel`` ways.

        TP splits query heads, KV groups and the SwiGLU width evenly (the vocabulary is padded instead); PP
        gives every stage the same number of layers.
        """
        _require(
            _is_positive_int(tensor_parallel),
            f"tensor_parallel must be an integer >= 1; got {tensor_parallel!r}",
        )
        _require(
            _is_positive_int(pipeline_parallel),
            f"pipeline_parallel must be an integer >= 1; got {pipeline_parallel!r}",
        )
        tp_limit = math.gcd(self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(
                value % tensor_parallel == 0,
                f"{name}={value} is not divisible by tensor_parallel={tensor_parallel}; "
                f"use TP in {_braced(_divisors(tp_limit))}",
            )
        _require(
            self.num_layers % pipeline_parallel == 0,
            f"num_layers={self.num_layers} is not divisible by pipeline_parallel={pipeline_parallel}; "
            f"use PP in {_braced(_divisors(self.num_layers))}",
        )

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face ``config.json`` dict (Qwen2/Qwen3/Llama ForCausalLM) onto a ``ModelConfig``.

        Reads ``rope_theta``/``rope_scaling`` (transformers 4.x) or ``rope_parameters`` (transformers 5).
        Features we cannot express (sliding-window attention, o_proj/MLP biases, non-silu activations, rope
        types other than llama3) raise ``ValueError`` rather than being silently dropped.
        """
        architecture = _hf_architecture(hf_config)
        _check_hf_features(hf_config, architecture)
        theta, scaling = _hf_rope(hf_config)
        config = cls(
            architecture=architecture,
            num_layers=_hf_key(hf_config, "num_hidden_layers"),
            hidden_size=_hf_key(hf_config, "hidden_size"),
            ffn_hidden_size=_hf_key(hf_config, "intermediate_size"),
            num_attention_heads=_hf_key(hf_config, "num_attention_heads"),
            num_query_groups=hf_config.get("num_key_value_heads", hf_config.get("num_attention_heads")),
            vocab_size=_hf_key(hf_config, "vocab_size"),
            max_position_embeddings=_hf_key(hf_config, "max_position_embeddings"),
            rotary_base=float(theta),
            norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),  # transformers' default for all three
            head_dim=hf_config.get("head_dim"),
            rope_scaling=scaling,
            add_qkv_bias=architecture == "qwen2",  # Qwen2 attention always has q/k/v biases
            qk_layernorm=architecture == "qwen3",
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            init_method_std=float(hf_config.get("initializer_range", 0.02)),
        )
        config.validate()
        return config

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` fields this config determines (inverse of ``from_hf_config``)."""
        hf = {
            "architectures": [_HF_CLASS_OF[self.architecture]],
            "model_type": self.architecture,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_base,
            "rope_scaling": None,
            "rms_norm_eps": self.norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.init_method_std,
        }
        if self.head_dim is not None:
            hf["head_dim"] = self.head_dim
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.architecture != "qwen2":
            hf["attention_bias"] = False
        return hf


def _hf_key(hf_config: dict[str, Any], key: str) -> Any:
    _require(key in hf_config, f"HF config has no {key!r}: is this a decoder-only LM's config.json?")
    return hf_config[key]


def _hf_architecture(hf_config: dict[str, Any]) -> str:
    names = hf_config.get("architectures") or []
    if names:
        _require(
            len(names) == 1 and names[0] in HF_ARCHITECTURES,
            f"unsupported HF architecture {names}; supported: {', '.join(HF_ARCHITECTURES)}",
        )
        return HF_ARCHITECTURES[names[0]]
    model_type = hf_config.get("model_type")
    _require(
        model_type in ARCHITECTURES,
        f"unsupported HF model_type {model_type!r} (and no 'architectures'); supported: "
        f"{', '.join(HF_ARCHITECTURES)}",
    )
    return model_type


def _check_hf_features(hf_config: dict[str, Any], architecture: str) -> None:
    """Refuse HF options that the Megatron model built here would silently not implement."""
    act = hf_config.get("hidden_act", "silu")
    _require(act == "silu", f"HF hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    _require(
        not hf_config.get("use_sliding_window", False),
        "HF use_sliding_window=true is not supported: set it to false (the Qwen2.5/Qwen3 releases ship "
        "it false)",
    )
    if architecture != "qwen2":
        # HF Llama/Qwen3 put attention_bias on q, k, v AND o_proj; Megatron's add_qkv_bias covers q/k/v only.
        _require(
            not hf_config.get("attention_bias", False),
            f"HF attention_bias=true ({architecture}) adds an o_proj bias that Megatron's add_qkv_bias "
            "cannot express",
        )
    _require(
        not hf_config.get("mlp_bias", False), "HF mlp_bias=true is not supported (add_bias_linear=False)"
    )


def _hf_rope(hf_config: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, scaling) from transformers-4 ``rope_theta``/``rope_scaling`` or -5 ``rope_parameters``."""
    params = hf_config.get("rope_parameters")
    if params is not None:
        theta, scaling = params.get("rope_theta", hf_config.get("rope_theta")), params
    else:
        theta, scaling = hf_config.get("rope_theta"), hf_config.get("rope_scaling")
    _require(_is_positive_number(theta), f"HF config needs a positive rope_theta; got {theta!r}")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return theta, None
    _require(
        rope_type == "llama3", f"HF rope type {rope_type!r} is not supported; supported: default, llama3"
    )
    return theta, Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


# ---------------------------------------------------------------------------------------------------------
# Presets (HF config.json values of the released checkpoints)
# ---------------------------------------------------------------------------------------------------------


def qwen2_5_1_5b() -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-1.5B (from Qwen2.5-Math-1.5B), the paper's student; untied head."""
    return _validated(
        ModelConfig(
            architecture="qwen2",
            num_layers=28,
            hidden_size=1536,
            ffn_hidden_size=8960,
            num_attention_heads=12,
            num_query_groups=2,
            vocab_size=151936,
            max_position_embeddings=131072,
            rotary_base=10000.0,
            norm_epsilon=1e-6,
            add_qkv_bias=True,
            tie_word_embeddings=False,
        )
    )


def qwen2_5_7b() -> ModelConfig:
    """Skywork-OR1-7B / -Math-7B shape (DeepSeek-R1-Distill-Qwen-7B fine-tunes): the paper's 7B teachers.

    rope_theta is 10000, inherited from Qwen2.5-Math-7B through R1-Distill-Qwen-7B (not Qwen2.5-7B's 1e6);
    recalled, not read from the checkpoint here: real runs build from its config.json (``from_hf_config``).
    """
    return _validated(
        ModelConfig(
            architecture="qwen2",
            num_layers=28,
            hidden_size=3584,
            ffn_hidden_size=18944,
            num_attention_heads=28,
            num_query_groups=4,
            vocab_size=152064,
            max_position_embeddings=131072,
            rotary_base=10000.0,
            norm_epsilon=1e-6,
            add_qkv_bias=True,
            tie_word_embeddings=False,
        )
    )


def qwen3_1_7b() -> ModelConfig:
    """Qwen3-1.7B: the paper's Qwen3 student (its -Base checkpoint has max_position_embeddings 32768)."""
    return _validated(
        ModelConfig(
            architecture="qwen3",
            num_layers=28,
            hidden_size=2048,
            ffn_hidden_size=6144,
            num_attention_heads=16,
            num_query_groups=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rotary_base=1e6,
            norm_epsilon=1e-6,
            qk_layernorm=True,
            tie_word_embeddings=True,
        )
    )


def qwen3_4b() -> ModelConfig:
    """Qwen3-4B: the paper's Qwen3 teacher. Its head_dim 128 exceeds hidden/heads = 80."""
    return _validated(
        ModelConfig(
            architecture="qwen3",
            num_layers=36,
            hidden_size=2560,
            ffn_hidden_size=9728,
            num_attention_heads=32,
            num_query_groups=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rotary_base=1e6,
            norm_epsilon=1e-6,
            qk_layernorm=True,
            tie_word_embeddings=True,
        )
    )


def llama3_8b() -> ModelConfig:
    """Llama-3.1-8B: Llama-3 RoPE scaling (factor 8, low 1, high 4, original context 8192)."""
    return _validated(
        ModelConfig(
            architecture="llama",
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_attention_heads=32,
            num_query_groups=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rotary_base=500000.0,
            norm_epsilon=1e-5,
            rope_scaling=Llama3RopeScaling(factor=8.0),
        )
    )


def tiny(architecture: str = "qwen2", **overrides: Any) -> ModelConfig:
    """A 4-layer, 64-wide model of ``architecture`` for CPU tests; ``overrides`` replace any field.

    Each family keeps its defining features so tests exercise them: qwen2 has q/k/v biases and an untied
    head; qwen3 has qk RMSNorm, a tied head and head_dim 32 != hidden/heads; llama has Llama-3 RoPE scaling.
    The vocabulary (300) is deliberately not a multiple of the padding, so padded rows exist at every TP.
    """
    _require(
        architecture in ARCHITECTURES,
        f"tiny(architecture={architecture!r}): choose one of: {', '.join(ARCHITECTURES)}",
    )
    family = {
        "qwen2": {"add_qkv_bias": True},
        "qwen3": {"qk_layernorm": True, "head_dim": 32, "tie_word_embeddings": True, "rotary_base": 1e6},
        "llama": {
            "rope_scaling": Llama3RopeScaling(factor=8.0),
            "rotary_base": 500000.0,
            "norm_epsilon": 1e-5,
        },
    }[architecture]
    base = {
        "architecture": architecture,
        "num_layers": 4,
        "hidden_size": 64,
        "ffn_hidden_size": 96,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "rotary_base": 10000.0,
        "norm_epsilon": 1e-6,
    }
    return _validated(ModelConfig(**{**base, **family, **overrides}))


def _validated(config: ModelConfig) -> ModelConfig:
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ---------------------------------------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of ``divisible_by * TP``.

    Every TP rank then holds an equal, aligned slice of the embedding and the LM head. The padded rows are
    not tokens: consumers of the logits mask ids >= ``vocab_size``.
    """
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def _matmul_parameters_per_layer(config: ModelConfig) -> int:
    """Weights of the q/k/v, output and SwiGLU projections of one layer (no norms, no biases)."""
    hidden, heads_width = config.hidden_size, config.num_attention_heads * config.kv_channels
    qkv_width = (config.num_attention_heads + 2 * config.num_query_groups) * config.kv_channels
    return hidden * qkv_width + heads_width * hidden + 3 * hidden * config.ffn_hidden_size


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters as the HF checkpoint counts them (true vocabulary, no padding rows)."""
    per_layer = _matmul_parameters_per_layer(config) + 2 * config.hidden_size  # + input / pre-MLP norms
    if config.add_qkv_bias:
        per_layer += (config.num_attention_heads + 2 * config.num_query_groups) * config.kv_channels
    if config.qk_layernorm:
        per_layer += 2 * config.kv_channels
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return config.num_layers * per_layer + config.hidden_size + embeddings  # + final norm


def model_flops_per_token(config: ModelConfig, seq_len: int, *, forward_only: bool = False) -> float:
    """Model FLOPs per token for sequences of ``seq_len`` tokens: training by default, or one forward pass.

    PaLM's convention (Chowdhery et al. 2022, appendix B), the usual basis of MFU: a forward pass costs
    ``2 N`` for the matmul weights N (all projections plus the LM head -- tied or not it is a matmul -- but
    not the embedding lookup, norms or biases) plus ``4 L h d s`` for the attention scores and the weighted
    sum over values (L layers, h query heads of width d, full s x s, no causal discount); training (forward +
    backward) costs three times that: ``6 N + 12 L h d s``. Uses the true vocabulary, so the number does not
    depend on the TP size (the padded rows add ``2 * (padded - true) * hidden`` per token of real work).
    """
    _require(_is_positive_int(seq_len), f"seq_len must be an integer >= 1; got {seq_len!r}")
    matmul_weights = config.num_layers * _matmul_parameters_per_layer(config)
    matmul_weights += config.vocab_size * config.hidden_size
    attention = 4 * config.num_layers * config.num_attention_heads * config.kv_channels * seq_len
    forward = 2 * matmul_weights + attention
    return float(forward if forward_only else 3 * forward)


# ---------------------------------------------------------------------------------------------------------
# Building the Megatron model
# ---------------------------------------------------------------------------------------------------------


def _megatron_rope_kwargs(config: ModelConfig) -> dict[str, Any]:
    """GPTModel's ``rope_scaling`` arguments; raise if Megatron cannot express ``config.rope_scaling``.

    Megatron-Core (0.16-0.19) implements HF's "llama3" scaling formula exactly, but ``GPTModel`` forwards
    only ``rope_scaling_factor``: low_freq_factor, high_freq_factor and original_max_position_embeddings
    are fixed at 1, 4 and 8192 inside ``RotaryEmbedding._apply_scaling``. Llama 3.1/3.2/3.3 use exactly
    those; anything else would silently get the wrong frequencies, so we refuse it.
    """
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_scaling": False}
    for name, fixed in _MEGATRON_LLAMA3_FIXED.items():
        _require(
            getattr(scaling, name) == fixed,
            f"model.rope_scaling.{name}={getattr(scaling, name)} cannot be built: Megatron-Core's Llama-3 "
            f"RoPE scaling fixes {name}={fixed} (only 'factor' is configurable); use a checkpoint with the "
            "Llama-3.1 defaults",
        )
    return {"rope_scaling": True, "rope_scaling_factor": float(scaling.factor)}


def _default_params_dtype() -> torch.dtype:
    """bf16 on GPU (what the checkpoints are trained in), fp32 on CPU (exact CPU tests, no bf16 GEMMs)."""
    return torch.bfloat16 if default_device().type == "cuda" else torch.float32


def _use_transformer_engine() -> bool:
    """TE layers only with a GPU and an importable TE (never on CPU: TE there breaks ``import megatron``)."""
    if default_device().type != "cuda":
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def _transformer_config(
    config: ModelConfig, tensor_parallel: int, pipeline_parallel: int, dtype: torch.dtype
):
    """Megatron ``TransformerConfig`` for ``config`` on a TP x PP layout.

    The TP/PP sizes must be set here, not only in the process groups: without them every PP stage silently
    builds all layers. Dropout is off (distillation scores and trains on exact log-probs), and Megatron's own
    weight init is skipped (``perform_initialization=False``): ``initialize_weights`` does it layout-free.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = default_device().type != "cuda"
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # dtype of the activations sent between PP stages
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,  # allocate on the CPU (and keep RoPE's inv_freq there)
        perform_initialization=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization=config.normalization,
        layernorm_epsilon=config.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 holds [gate; up], silu(gate) * up
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        init_method_std=config.init_method_std,
    )


def _layer_spec(config: ModelConfig):
    """Transformer-Engine layers on GPU when TE is present, else Megatron's local (pure torch) layers."""
    from megatron.core.models.gpt import gpt_layer_specs

    if _use_transformer_engine():  # TE's fused norm reads config.normalization itself
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=config.qk_layernorm, normalization=config.normalization
    )


def _check_group_sizes(pg_collection: ProcessGroupCollection, tensor_parallel: int, pipeline_parallel: int):
    """The layout sizes passed in must be the sizes of the groups the model will communicate over."""
    for name, expected in (("tp", tensor_parallel), ("pp", pipeline_parallel)):
        group = getattr(pg_collection, name, None)
        _require(
            group is not None,
            f"pg_collection has no '{name}' group: build it with megatron_tropd.topology (or "
            "ProcessGroupCollection.use_mpu_process_groups())",
        )
        size = torch.distributed.get_world_size(group)
        _require(
            size == expected,
            f"pg_collection.{name} has {size} ranks but the model is built for {name.upper()}={expected}: "
            "pass the layout the process groups were made for",
        )


def build_gpt_model(
    model_config: ModelConfig,
    pg_collection: ProcessGroupCollection,
    *,
    pre_process: bool,
    post_process: bool,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    params_dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> GPTModel:
    """Build this rank's stage of ``model_config`` as a Megatron-Core ``GPTModel`` on ``pg_collection``.

    ``pre_process`` / ``post_process``: this rank holds the embedding / the final norm and LM head (the
    first / last PP stage). Logits come out vocab-parallel: ``[batch, seq, padded_vocab / TP]``.
    ``params_dtype`` defaults to bf16 on GPU and fp32 on CPU (training wraps the model in Megatron's
    ``Float16Module``/DDP as usual, for fp32 logits and main grads). ``seed``: the weights are
    ``initialize_weights(model, seed)`` -- identical for every layout -- or, with ``seed=None``, left
    uninitialised (``torch.empty``) because a checkpoint is loaded next.
    Running the model needs Megatron's RNG tracker seeded (``model_parallel_cuda_manual_seed``, part of
    process set-up): attention forks it for dropout even when the dropout probability is 0.
    """
    model_config.validate()
    model_config.validate_parallel(tensor_parallel_size, pipeline_parallel_size)
    rope_kwargs = _megatron_rope_kwargs(model_config)
    _check_group_sizes(pg_collection, tensor_parallel_size, pipeline_parallel_size)

    from megatron.core.models.gpt.gpt_model import GPTModel

    # pg_collection is what lets the teacher and the student live on different groups; a megatron-core
    # without it would silently use the global parallel_state groups.
    if "pg_collection" not in inspect.signature(GPTModel.__init__).parameters:
        raise RuntimeError("megatron-core >= 0.16 is needed: this GPTModel takes no pg_collection")
    dtype = params_dtype if params_dtype is not None else _default_params_dtype()
    model = GPTModel(
        config=_transformer_config(model_config, tensor_parallel_size, pipeline_parallel_size, dtype),
        transformer_layer_spec=_layer_spec(model_config),
        vocab_size=padded_vocab_size(
            model_config.vocab_size, model_config.make_vocab_size_divisible_by, tensor_parallel_size
        ),
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-parallel: the ops in ops/vocab_parallel.py consume shards
        share_embeddings_and_output_weights=model_config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_config.rotary_base,
        pg_collection=pg_collection,
        **rope_kwargs,
    )
    # Megatron allocates its linear layers on the GPU but the torch norms on the default (CPU) device, and
    # leaves the move to the caller (megatron-lm's get_model does model.cuda()); a no-op on CPU.
    model.to(default_device())
    mark_tensor_parallel_parameters(model)
    if seed is not None:
        initialize_weights(model, seed, vocab_size=model_config.vocab_size)
    return model


def mark_tensor_parallel_parameters(model: GPTModel) -> None:
    """Tag every TP-sharded parameter with Megatron's ``tensor_model_parallel`` / ``partition_dim``.

    Megatron sets these tags inside its own weight initialisers, which ``perform_initialization=False``
    skips; without them the optimizer counts a sharded weight as a TP replica, so the gradient norm (and
    with it clipping) silently drops every shard but rank 0's. The sharding axis is read from the
    model's ``sharded_state_dict`` (the description checkpoints reshard with), so any layer spec works.
    """
    from megatron.core.tensor_parallel.layers import (
        set_defaults_if_not_set_tensor_model_parallel_attributes,
        set_tensor_model_parallel_attributes,
    )

    owners = _owner_parameters(model)
    for sharded in sharded_parameters(model):
        split_axes = [
            axis - sharded.prepend_axis_num
            for axis, parts in enumerate(sharded.axis_fragmentations)
            if axis >= sharded.prepend_axis_num and parts > 1
        ]
        _, parameter = owners[sharded.data.untyped_storage().data_ptr()]
        if split_axes and not hasattr(parameter, "tensor_model_parallel"):  # fc1: two slices, one param
            set_tensor_model_parallel_attributes(parameter, True, split_axes[0], 1)
    for parameter in model.parameters():
        set_defaults_if_not_set_tensor_model_parallel_attributes(parameter)


# ---------------------------------------------------------------------------------------------------------
# Layout-independent initialisation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlobalTensorId:
    """One global (unsharded) tensor: a checkpoint key plus its offsets along prepended (layer) axes."""

    key: str
    layer_offsets: tuple[int, ...]


def _tensor_seed(seed: int, tensor_id: _GlobalTensorId) -> int:
    """A 63-bit seed from (seed, key, layer) that is the same in every process (unlike ``hash(str)``)."""
    text = f"{seed}|{tensor_id.key}|{','.join(map(str, tensor_id.layer_offsets))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _init_rule(key: str, init_std: float, num_layers: int) -> tuple[str, float]:
    """("zeros" | "ones" | "normal", std) for a checkpoint key, mirroring Megatron's own initialisation."""
    if key.endswith("bias"):
        return "zeros", 0.0
    module = key.rsplit(".", 1)[0]
    if key.endswith("layer_norm_weight") or module.endswith("layernorm"):
        return "ones", 0.0  # RMSNorm gains (input / pre-MLP norms are keyed as fused TE norms)
    if key.endswith(_RESIDUAL_OUTPUT_KEYS):
        return "normal", init_std / math.sqrt(2.0 * num_layers)  # Megatron's scaled_init_method_normal
    assert key.endswith("weight"), f"no initialisation rule for parameter {key!r}"
    return "normal", init_std


def _full_tensor(
    tensor_id: _GlobalTensorId,
    shape: tuple[int, ...],
    rule: tuple[str, float],
    seed: int,
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The whole global tensor (fp32, on ``device``); vocab-padded rows >= ``vocab_size`` are zero.

    Only the true-vocab rows are drawn, so the padded size (which grows with TP) does not shift any value.
    """
    kind, std = rule
    if kind != "normal":
        return (torch.zeros if kind == "zeros" else torch.ones)(shape, device=device)
    rows = shape[0]
    if tensor_id.key.endswith(_VOCAB_KEYS):
        assert rows >= vocab_size, f"{tensor_id.key}: {rows} rows < vocab_size {vocab_size}"
        rows = vocab_size
    generator = torch.Generator(device=device).manual_seed(_tensor_seed(seed, tensor_id))
    drawn = torch.randn((rows, *shape[1:]), generator=generator, device=device) * std
    return torch.nn.functional.pad(drawn, (0, 0) * (len(shape) - 1) + (0, shape[0] - rows))


def sharded_parameters(model: GPTModel) -> list[Any]:
    """This rank's ``ShardedTensor`` views of the model's parameters, factories (SwiGLU fc1) expanded."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pg_collection = getattr(model, "pg_collection", None)
    dp_cp_group = getattr(pg_collection, "dp_cp", None)
    # Without metadata Megatron would look the DP group up in the global parallel_state.
    metadata = {"dp_cp_group": dp_cp_group} if dp_cp_group is not None else None
    tensors = []
    for item in nested_values(model.sharded_state_dict(metadata=metadata)):
        if isinstance(item, ShardedTensorFactory):
            # SwiGLU: fc1's local [gate_r; up_r] is described as two slices of one global [gate; up].
            tensors.extend(t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            tensors.append(item)
    return tensors


def _owner_parameters(model: GPTModel) -> dict[int, tuple[str, torch.nn.Parameter]]:
    return {p.untyped_storage().data_ptr(): (n, p) for n, p in model.named_parameters()}


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int, *, vocab_size: int) -> None:
    """Initialise ``model`` so that its values depend on ``seed`` only, never on its TP/PP layout.

    For every parameter the full global tensor is drawn on the parameter's device, from a generator seeded
    by (seed, checkpoint key, global layer index), with Megatron's init: normal(0, init_method_std) for
    weights, std / sqrt(2 L) for the attention and MLP output projections, zeros for biases, ones for norm
    gains. Vocabulary padding rows (>= ``vocab_size``, the true vocabulary) are zero. Each rank copies in
    the slice its ``sharded_state_dict`` describes -- the description dist-checkpointing reshards with, so
    fused QKV (grouped per KV head) and SwiGLU fc1 ([gate; up], split per rank) land where they should.

    Cost: every rank draws the full tensors of its stage (a checkpoint load is the production path). Values
    are identical across layouts on one device type; CPU and CUDA generators give different streams.
    """
    init_std, num_layers = model.config.init_method_std, model.config.num_layers
    groups: dict[_GlobalTensorId, list[Any]] = {}
    for sharded in sharded_parameters(model):
        layer_offsets = tuple(sharded.global_offset[: sharded.prepend_axis_num])
        groups.setdefault(_GlobalTensorId(sharded.key, layer_offsets), []).append(sharded)

    owners, covered = _owner_parameters(model), {}
    for tensor_id, pieces in groups.items():
        first = pieces[0]
        shape = tuple(first.global_shape[first.prepend_axis_num :])
        rule = _init_rule(tensor_id.key, init_std, num_layers)
        full = _full_tensor(tensor_id, shape, rule, seed, vocab_size, first.data.device)
        for piece in pieces:
            offsets = piece.global_offset[piece.prepend_axis_num :]
            window = tuple(slice(o, o + n) for o, n in zip(offsets, piece.data.shape, strict=True))
            piece.data.copy_(full[window])  # piece.data is a view into the parameter
            name, _ = owners[piece.data.untyped_storage().data_ptr()]
            covered[name] = covered.get(name, 0) + piece.data.numel()
    for name, param in model.named_parameters():
        assert covered.get(name) == param.numel(), (
            f"{name}: initialised {covered.get(name)} of {param.numel()}"
        )
