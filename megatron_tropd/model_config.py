"""Model shapes in Hugging Face terms: ``ModelConfig``, the released checkpoints' presets, sizes and FLOPs.

Torch- and Megatron-free, so recipes and the command line can build and validate configurations cheaply;
``models.py`` turns a ``ModelConfig`` into a Megatron-Core ``GPTModel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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

# What transformers reads for a config.json that omits these fields (read in transformers 5.24's sources):
# ``RotaryEmbeddingConfigMixin.default_theta`` for all three architectures, and ``Qwen3Config.head_dim =
# 128``, where Qwen2 and Llama derive hidden / heads instead.
_HF_DEFAULT_ROPE_THETA = 10000.0
_HF_DEFAULT_HEAD_DIM = {"qwen3": 128}


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

    OVERRIDE_HOOKS: ClassVar[dict[str, str]] = {"from_hf": "with_shape_of_hf_model"}
    """Keys an override or a config file may set that are not fields: ``student.from_hf=/models/X`` calls
    ``with_shape_of_hf_model("/models/X")`` (``overrides`` applies them before the section's fields)."""

    def with_shape_of_hf_model(self, hf_dir: str) -> ModelConfig:
        """The shape of the Hugging Face model in ``hf_dir`` (its ``config.json``, read as ``from_hf_config``
        reads it); this config's vocabulary padding multiple is kept, as it belongs to the layout."""
        config = ModelConfig.from_hf_dir(hf_dir)
        return dataclasses.replace(config, make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)

    @classmethod
    def from_hf_dir(cls, hf_dir: str) -> ModelConfig:
        """``from_hf_config`` of ``hf_dir/config.json``; a ``ValueError`` naming the file on failure."""
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{path} does not exist: from_hf names a Hugging Face model directory")
        try:
            hf_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        try:
            return cls.from_hf_config(hf_config)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    @property
    def kv_channels(self) -> int:
        """Per-head width actually used: ``head_dim`` or ``hidden_size // num_attention_heads``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """Inverse of ``dataclasses.asdict`` (the JSON our checkpoints store), validated."""
        fields = dict(saved)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = Llama3RopeScaling(**fields["rope_scaling"])
        config = cls(**fields)
        config.validate()
        return config

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

    def validate_parallel(
        self, tensor_parallel: int, pipeline_parallel: int, *, model: str = "", key_prefix: str = ""
    ) -> None:
        """Raise ``ValueError`` if the model cannot be split ``tensor_parallel`` x ``pipeline_parallel`` ways.

        TP splits query heads, KV groups and the SwiGLU width evenly (the vocabulary is padded instead); PP
        gives every stage the same number of layers. ``model`` (``"teacher"``) and ``key_prefix``
        (``"parallel.teacher_"``) make the message name the run-config keys to fix, so that a run with two
        models says which one does not split.
        """
        tp_key, pp_key = f"{key_prefix}tensor_parallel", f"{key_prefix}pipeline_parallel"
        field = f"{model}." if model else ""
        _require(
            _is_positive_int(tensor_parallel), f"{tp_key} must be an integer >= 1; got {tensor_parallel!r}"
        )
        _require(
            _is_positive_int(pipeline_parallel),
            f"{pp_key} must be an integer >= 1; got {pipeline_parallel!r}",
        )
        tp_limit = math.gcd(self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(
                value % tensor_parallel == 0,
                f"{field}{name}={value} is not divisible by {tp_key}={tensor_parallel}; "
                f"use TP in {_braced(_divisors(tp_limit))}",
            )
        _require(
            self.num_layers % pipeline_parallel == 0,
            f"{field}num_layers={self.num_layers} is not divisible by {pp_key}={pipeline_parallel}; "
            f"use PP in {_braced(_divisors(self.num_layers))}",
        )

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face ``config.json`` dict (Qwen2/Qwen3/Llama ForCausalLM) onto a ``ModelConfig``.

        Reads ``rope_theta``/``rope_scaling`` (transformers 4.x) or ``rope_parameters`` (transformers 5); a
        missing ``rope_theta`` or ``head_dim`` takes transformers' default, so both build the same model.
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
            head_dim=hf_config.get("head_dim", _HF_DEFAULT_HEAD_DIM.get(architecture)),
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
        if self.head_dim is not None or self.architecture in _HF_DEFAULT_HEAD_DIM:
            hf["head_dim"] = self.kv_channels  # a Qwen3 config.json without it means 128, not hidden / heads
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.architecture != "qwen2":
            hf["attention_bias"] = False
        return hf


def require_megatron_rope(scaling: Llama3RopeScaling | None) -> None:
    """Raise ``ValueError`` if Megatron-Core cannot build ``scaling`` exactly.

    Megatron-Core (0.16-0.19) implements HF's "llama3" scaling formula exactly, but ``GPTModel`` forwards
    only ``rope_scaling_factor``: the other three parameters are fixed inside
    ``RotaryEmbedding._apply_scaling``. Llama 3.1/3.2/3.3 use exactly those; anything else would silently
    get the wrong frequencies. Torch-free, so conversion refuses it before any rank starts.
    """
    if scaling is None:
        return
    for name, fixed in _MEGATRON_LLAMA3_FIXED.items():
        _require(
            getattr(scaling, name) == fixed,
            f"rope_scaling.{name}={getattr(scaling, name)} cannot be built: Megatron-Core's Llama-3 RoPE "
            f"scaling fixes {name}={fixed} (only 'factor' is configurable); use a checkpoint with the "
            "Llama-3.1 defaults (low_freq_factor=1.0, high_freq_factor=4.0, "
            "original_max_position_embeddings=8192)",
        )


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
    theta = _HF_DEFAULT_ROPE_THETA if theta is None else theta
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
