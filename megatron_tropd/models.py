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

import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_tropd.model_config import (  # re-exported: the shapes live torch-free in model_config
    ARCHITECTURES,
    HF_ARCHITECTURES,
    Llama3RopeScaling,
    ModelConfig,
    _require,
    count_parameters,
    llama3_8b,
    model_flops_per_token,
    padded_vocab_size,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen3_1_7b,
    qwen3_4b,
    require_megatron_rope,
    tiny,
)
from megatron_tropd.runtime import default_device

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
    "mark_tensor_parallel_parameters",
    "model_flops_per_token",
    "padded_vocab_size",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen3_1_7b",
    "qwen3_4b",
    "sharded_parameters",
    "tiny",
]

# Keys whose first axis is the (padded) vocabulary; the tied output layer on the last PP stage reuses the
# embedding key, so both stages draw the same rows.
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Output projections of each residual branch: Megatron scales their init std by 1/sqrt(2 * num_layers).
_RESIDUAL_OUTPUT_KEYS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


# ---------------------------------------------------------------------------------------------------------
# Building the Megatron model
# ---------------------------------------------------------------------------------------------------------


def _megatron_rope_kwargs(config: ModelConfig) -> dict[str, Any]:
    """GPTModel's ``rope_scaling`` arguments; raise if Megatron cannot express ``config.rope_scaling``."""
    require_megatron_rope(config.rope_scaling)
    if config.rope_scaling is None:
        return {"rope_scaling": False}
    return {"rope_scaling": True, "rope_scaling_factor": float(config.rope_scaling.factor)}


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def params_dtype_for(precision: str) -> torch.dtype:
    """The parameter dtype of a precision setting (``train.precision``); auto: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return _default_params_dtype()
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of auto, {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


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
    """Transformer-Engine layers on GPU when TE is present, else Megatron's local (pure torch) layers,
    whose attention also runs packed sequences (``attention.py``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if _use_transformer_engine():  # TE's fused norm reads config.normalization itself
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron_tropd.attention import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=config.qk_layernorm, normalization=config.normalization
    )
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention  # packed THD too
    return spec


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
    _cast_parameters(model, dtype)
    mark_tensor_parallel_parameters(model)
    if seed is not None:
        initialize_weights(model, seed, vocab_size=model_config.vocab_size)
    return model


def _cast_parameters(model: GPTModel, dtype: torch.dtype) -> None:
    """Give every parameter ``params_dtype``: the torch norms ignore it and stay fp32, and Megatron's
    mixed-precision optimizer pairs bf16 model params with fp32 main params by position, so one stray
    fp32 parameter misaligns its whole checkpoint state (megatron-lm's ``Float16Module`` does the same
    cast). Buffers (rotary frequencies) keep their precision."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


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
