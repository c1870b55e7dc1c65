"""Hugging Face safetensors <-> Megatron dist-checkpoint conversion, on any TP/PP layout, with a logits check.

Import (``hf_to_megatron``) builds the Megatron model on the requested layout and streams the HF tensors one
at a time (``safe_open``): each rank reads only the tensors of its pipeline stage, turns them into the global
Megatron tensor (``mapping.py``) and copies in the window its ``ShardedTensor`` describes, so peak memory is
one model stage plus one global tensor. The result is a ``save_model_weights`` directory, loadable on any
layout, holding also ``model_config.json``, the source ``hf_config.json`` and the tokenizer files.

Export (``megatron_to_hf``) loads any Megatron weights (conversion output, ``save_checkpoint`` step or run
root) into a TP1 x PP1 model and writes sharded safetensors plus ``model.safetensors.index.json`` and a
``config.json`` that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

What depends only on config.json and the safetensors headers (the architecture, RoPE scaling Megatron
cannot build, every tensor's name and shape) is refused before any process group exists
(``check_import_inputs``). A NaN or inf weight is refused naming the tensor: on import as each rank reads
its HF tensors, on export as each HF tensor is written (an overflow of the export dtype included).

Both write into a hidden sibling directory, sync it to disk and rename it into place at the end
(``checkpoint.atomic``): an output directory is complete or absent, also after a crash. An existing output
is refused unless ``force``; then it is replaced only once the new one is complete. Both are collective
over the default process group (gloo or NCCL); ``import_job`` / ``export_job`` are the per-rank entry
points that ``tools/convert.py`` spawns or runs under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tropd.checkpoint import (
    CHECKPOINT_METADATA,
    CheckpointError,
    latest_checkpoint,
    load_model_weights,
    save_model_weights,
)
from megatron_tropd.checkpoint.atomic import fsync_files, publish_directory
from megatron_tropd.checkpoint.collective import on_rank0  # rank-0 decisions raised on every rank
from megatron_tropd.hf.mapping import (
    IGNORED_HF_SUFFIXES,
    TensorMapping,
    expected_hf_names,
    expected_hf_shapes,
    hf_from_megatron,
    hf_names,
    mappings_for,
    megatron_from_hf,
)
from megatron_tropd.model_config import ModelConfig, require_megatron_rope
from megatron_tropd.placed import PlacedModel

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "HfCheckpoint",
    "Refusal",
    "check_export_inputs",
    "check_import_inputs",
    "LogitsComparison",
    "compare_logits",
    "verify_length",
    "export_job",
    "hf_to_megatron",
    "import_job",
    "megatron_to_hf",
    "prompt_tokens",
    "read_hf_checkpoint",
    "read_megatron_config",
    "refusing_bad_input",
]

HF_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MODEL_CONFIG = "model_config.json"
"""Our ``ModelConfig`` as JSON, next to the converted weights."""
SOURCE_HF_CONFIG = "hf_config.json"
"""The source ``config.json``: export keeps the fields ModelConfig does not hold (token ids, dtype)."""
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied unchanged from the source to the output in both directions (those that exist)."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size for save_pretrained
_FINITE_CHECK_CHUNK = 1 << 24
"""Elements per ``isfinite`` pass: bounds the temporary mask that checking a vocabulary-sized tensor needs."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_VERIFY_PROMPTS = 4
DEFAULT_VERIFY_SEQ_LEN = 1024
"""Cap on the default positions per verify prompt: long enough for a wrong RoPE scaling to show (it grows
with the position), short enough that each side's fp32 logits (prompts x positions x vocabulary: 2.5 GB for
a 152k vocabulary) fit in host memory."""


# ---------------------------------------------------------------------------------------------------------
# Reading and checking inputs (no process group needed: bad input fails before any rank starts)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfCheckpoint:
    """A checked HF checkpoint directory: its config and where each tensor lives."""

    directory: Path
    hf_config: dict[str, Any]
    model_config: ModelConfig
    tensor_files: dict[str, Path]
    """HF tensor name -> the safetensors file holding it."""
    tensor_shapes: dict[str, tuple[int, ...]]
    """HF tensor name -> its shape, from the safetensors headers."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {what}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-download or re-save it") from None


def _non_finite_count(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or +-inf (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    chunks = range(0, flat.numel(), _FINITE_CHECK_CHUNK)
    return sum(int((~torch.isfinite(flat[i : i + _FINITE_CHECK_CHUNK])).sum()) for i in chunks)


def _file_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each tensor in one safetensors file, from its header (no tensor data is read); a
    missing, truncated or corrupt file raises naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"safetensors shard {path} is missing: re-download the checkpoint (or the shard)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            return {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise ValueError(
            f"safetensors shard {path} cannot be read ({exc}): the file is truncated or corrupt; "
            "re-download it"
        ) from None


def _tensor_index(directory: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """(HF tensor name -> file, name -> shape), from ``model.safetensors.index.json`` or a single
    ``model.safetensors``."""
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path, "")["weight_map"]
        files = {directory / name for name in weight_map.values()}
        held = {path: _file_tensor_shapes(path) for path in sorted(files)}
        for name, file_name in weight_map.items():
            if name not in held[directory / file_name]:
                raise ValueError(
                    f"{index_path} lists {name!r} in {file_name}, which does not hold it: the index and the "
                    "shards come from different checkpoints; re-download them together"
                )
        files = {name: directory / file_name for name, file_name in weight_map.items()}
        return files, {name: held[path][name] for name, path in files.items()}
    single = directory / SAFETENSORS_SINGLE
    if single.is_file():
        shapes = _file_tensor_shapes(single)
        return dict.fromkeys(shapes, single), shapes
    raise ValueError(
        f"{directory} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}: only safetensors checkpoints "
        "are read (re-save a PyTorch .bin checkpoint with save_pretrained(safe_serialization=True))"
    )


def _check_tensor_names(tensor_files: dict[str, Path], config: ModelConfig, directory: Path) -> None:
    """Every tensor the architecture needs is present, and no weight would be silently dropped."""
    expected = expected_hf_names(config)
    missing = [name for name in expected if name not in tensor_files]
    if missing:
        raise ValueError(
            f"{directory} lacks {len(missing)} tensor(s) that config.json implies, e.g. {missing[:4]}: the "
            "config and the weights disagree (or the checkpoint is incomplete)"
        )
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unused = [n for n in tensor_files if n not in allowed and not n.endswith(IGNORED_HF_SUFFIXES)]
    if unused:
        raise ValueError(
            f"{directory} holds {len(unused)} tensor(s) that a {config.architecture} model has no place for, "
            f"e.g. {sorted(unused)[:4]}: the checkpoint has features this converter does not support"
        )


def _implied_dims(config: ModelConfig) -> str:
    return (
        f"hidden_size={config.hidden_size}, intermediate_size={config.ffn_hidden_size}, "
        f"num_attention_heads={config.num_attention_heads}, num_key_value_heads={config.num_query_groups}, "
        f"head_dim={config.kv_channels}, vocab_size={config.vocab_size}"
    )


def _check_tensor_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, directory: Path) -> None:
    """Every tensor has the shape config.json implies (read from the headers, before any rank starts)."""
    wrong = [
        f"{name!r} is {shapes[name]}, config.json implies {expected}"
        for name, expected in expected_hf_shapes(config).items()
        if shapes[name] != expected
    ]
    if wrong:
        raise ValueError(
            f"{directory}: {len(wrong)} tensor shape(s) disagree with config.json ({_implied_dims(config)}), "
            f"e.g. {'; '.join(wrong[:3])}: use the config.json saved with these weights"
        )


def _model_config_of(hf_config: dict[str, Any], path: Path) -> ModelConfig:
    """The ``ModelConfig`` of an HF config.json that Megatron can build; errors name the file."""
    try:
        model_config = ModelConfig.from_hf_config(hf_config)
        require_megatron_rope(model_config.rope_scaling)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return model_config


def read_hf_checkpoint(hf_dir: str | os.PathLike) -> HfCheckpoint:
    """Read and check an HF checkpoint directory (config, shards, tensor names and shapes) without loading
    weights.

    Raises ``ValueError`` naming the file for: no config.json, an unsupported architecture (the message lists
    the supported ones), RoPE scaling that Megatron cannot build, an index naming a missing shard, a
    truncated shard, missing or unexpected tensors, a tensor whose shape disagrees with config.json.
    """
    directory = Path(hf_dir)
    if not directory.is_dir():
        raise ValueError(f"HF checkpoint directory {directory} does not exist")
    hf_config = _read_json(directory / HF_CONFIG, "an HF checkpoint directory needs its config.json")
    model_config = _model_config_of(hf_config, directory / HF_CONFIG)
    tensor_files, tensor_shapes = _tensor_index(directory)
    _check_tensor_names(tensor_files, model_config, directory)
    _check_tensor_shapes(tensor_shapes, model_config, directory)
    return HfCheckpoint(directory, hf_config, model_config, tensor_files, tensor_shapes)


def read_megatron_config(ckpt_dir: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """The weights directory at ``ckpt_dir`` (or named by its ``latest``) and its saved ``ModelConfig``."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise ValueError(f"Megatron checkpoint {path} does not exist")
    directory = latest_checkpoint(path) or path
    metadata = _read_json(
        directory / CHECKPOINT_METADATA,
        "pass a directory written by hf_to_megatron, save_model_weights or save_checkpoint",
    )
    return directory, ModelConfig.from_dict(metadata["model_config"])


def _check_output_dir(out_dir: str | os.PathLike, force: bool, source: Path) -> Path:
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ValueError(f"output directory {out} is the input directory: write the conversion elsewhere")
    if out.exists() and not force:
        raise ValueError(
            f"output directory {out} already exists: choose a new one, or pass --force to replace it"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory: remove it or choose another")
    return out


def check_import_inputs(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tensor_parallel: int, pipeline_parallel: int,
    force: bool,
) -> tuple[HfCheckpoint, Path]:  # fmt: skip
    """Everything ``hf_to_megatron`` refuses, checked without a process group (the CLI calls it first)."""
    checkpoint = read_hf_checkpoint(hf_dir)
    checkpoint.model_config.validate_parallel(tensor_parallel, pipeline_parallel)
    return checkpoint, _check_output_dir(out_dir, force, checkpoint.directory)


def check_export_inputs(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool, dtype: str | None
) -> tuple[Path, ModelConfig, Path]:
    """Everything ``megatron_to_hf`` refuses, checked without a process group (the CLI calls it first)."""
    directory, config = read_megatron_config(ckpt_dir)
    require_megatron_rope(config.rope_scaling)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not supported; choose one of: {', '.join(_DTYPES)}")
    return directory, config, _check_output_dir(out_dir, force, directory)


# ---------------------------------------------------------------------------------------------------------
# Process groups, model, collective error handling
# ---------------------------------------------------------------------------------------------------------


def _require_distributed() -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            "conversion is collective: run it under torchrun or through tools/convert.py (which spawns the "
            "ranks), or call megatron_tropd.runtime.init_distributed() first"
        )


def _build_model(model_config: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> PlacedModel:
    """This rank's stage on a fresh TP x PP topology (extra ranks: data-parallel replicas), weights empty."""
    from megatron_tropd.placed import one_model_groups, place_model

    groups = one_model_groups(tensor_parallel, pipeline_parallel, seed=1234)
    return place_model(model_config, groups, seed=None)


def _collectively(fn, *args: Any) -> Any:
    """Run ``fn`` on every rank; a failure on one rank (say, a bad tensor of one PP stage) is raised on all,
    so no rank is left waiting in the next collective. User errors stay ``ValueError``."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as exc:  # shared below, then raised on every rank
        error = (isinstance(exc, ValueError), str(exc) if isinstance(exc, ValueError) else repr(exc))
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, found) for rank, found in enumerate(errors) if found is not None]
    if failed:
        rank, (is_value_error, message) = failed[0]
        message = message if rank == dist.get_rank() else f"on rank {rank}: {message}"
        raise (ValueError if is_value_error else RuntimeError)(message)
    return result


def _grouped_pieces(model) -> dict[tuple[str, tuple[int, ...]], list[Any]]:
    """This rank's ShardedTensors grouped per global tensor: (key, layer offsets) -> pieces."""
    from megatron_tropd.models import sharded_parameters

    groups: dict[tuple[str, tuple[int, ...]], list[Any]] = {}
    for piece in sharded_parameters(model):
        groups.setdefault((piece.key, tuple(piece.global_offset[: piece.prepend_axis_num])), []).append(piece)
    return groups


def _window(piece) -> tuple[slice, ...]:
    offsets = piece.global_offset[piece.prepend_axis_num :]
    return tuple(slice(o, o + n) for o, n in zip(offsets, piece.data.shape, strict=True))


def _global_shape(piece) -> tuple[int, ...]:
    return tuple(piece.global_shape[piece.prepend_axis_num :])


# ---------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------


class _ShardReader:
    """One open ``safe_open`` handle per shard file; ``get`` reads a single tensor."""

    def __init__(self, tensor_files: dict[str, Path]):
        self._files, self._handles = tensor_files, {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        try:
            tensor = self._handles[path].get_tensor(name)
        except Exception as exc:
            raise ValueError(f"cannot read {name!r} from {path} ({exc}): the shard is corrupt") from None
        # Checked here, where each rank reads its own stage's tensors anyway: a scan before the ranks
        # start would read the whole checkpoint a second time.
        bad = _non_finite_count(tensor)
        if bad:
            raise ValueError(
                f"HF tensor {name!r} in {path} has {bad} non-finite value(s) (NaN or inf) of "
                f"{tensor.numel()}: the checkpoint is corrupt or was saved from a diverged run; re-download "
                "it or convert an earlier checkpoint"
            )
        return tensor


@torch.no_grad()
def _fill_stage_from_hf(model, checkpoint: HfCheckpoint) -> None:
    """Copy this rank's window of every global tensor, built from the HF tensors one at a time."""
    config, reader = checkpoint.model_config, _ShardReader(checkpoint.tensor_files)
    table = {mapping.megatron_key: mapping for mapping in mappings_for(config)}
    filled = 0
    for (key, layer_offsets), pieces in _grouped_pieces(model).items():
        assert key in table, f"the model has {key!r}, which the {config.architecture} table lacks"
        mapping = table[key]
        layer = layer_offsets[0] if layer_offsets else None
        hf_tensors = [reader.get(name) for name in hf_names(mapping, layer)]
        full = megatron_from_hf(mapping, hf_tensors, config, _global_shape(pieces[0]))
        for piece in pieces:
            piece.data.copy_(full[_window(piece)])  # piece.data is a view into the parameter
            filled += piece.data.numel()
        del full, hf_tensors  # one global tensor at a time
    total = sum(p.numel() for p in model.parameters())
    assert filled == total, f"filled {filled} of {total} parameter values"


def _new_staging_dir(out: Path) -> Path:
    """A hidden sibling of ``out`` (same file system: the final rename is atomic), one name on all ranks."""
    nonce = on_rank0(secrets.token_hex, 4)
    return out.parent / f".{out.name}.converting-{nonce}"


def _copy_side_files(source: Path, target: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _publish(staging: Path, out: Path) -> None:
    """Rank 0: sync the complete ``staging`` to disk and rename it to ``out``; an existing ``out`` (force was
    checked by the caller) is deleted only after that."""
    fsync_files(staging)  # safetensors and json writes are not synced by their writers
    replaced = publish_directory(staging, out, aside=out.parent / f"{staging.name}.replaced")
    if replaced is not None:
        shutil.rmtree(replaced)


def _finish_import(staging: Path, out: Path, checkpoint: HfCheckpoint) -> None:
    _write_json(staging / MODEL_CONFIG, dataclasses.asdict(checkpoint.model_config))
    _write_json(staging / SOURCE_HF_CONFIG, checkpoint.hf_config)
    _copy_side_files(checkpoint.directory, staging)
    _publish(staging, out)


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    force: bool = False,
) -> Path:
    """Convert an HF checkpoint into a Megatron weights directory saved from a TP x PP model; returns it.

    Collective over the default group, whose size must be a multiple of TP x PP. Inputs and the output path
    are checked before any process group is touched. The output loads with ``load_model_weights`` on any
    layout.
    """
    checkpoint, out = check_import_inputs(hf_dir, out_dir, tensor_parallel, pipeline_parallel, force)
    _require_distributed()
    model = _build_model(checkpoint.model_config, tensor_parallel, pipeline_parallel).stage
    _collectively(_fill_stage_from_hf, model, checkpoint)
    staging = _new_staging_dir(out)
    try:
        save_model_weights(staging, model, checkpoint.model_config)
        on_rank0(_finish_import, staging, out, checkpoint)
    finally:
        on_rank0(shutil.rmtree, staging, True)  # only left over after a failure
    logger.info("converted %s -> %s (TP=%d, PP=%d)", hf_dir, out, tensor_parallel, pipeline_parallel)
    return out


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def _global_tensor(pieces: list[Any]) -> torch.Tensor:
    """One global tensor of a TP1 x PP1 model on the CPU: the parameter itself when one piece covers it (no
    copy, so export holds one model copy), else assembled (SwiGLU fc1's [gate; up] windows)."""
    shape = _global_shape(pieces[0])
    if len(pieces) == 1 and tuple(pieces[0].data.shape) == shape:
        return pieces[0].data.detach().cpu()
    full = torch.empty(shape, dtype=pieces[0].data.dtype)
    for piece in pieces:
        full[_window(piece)] = piece.data.detach().cpu()
    return full


def _hf_tensors(model, config: ModelConfig, dtype: torch.dtype):
    """Yield (HF name, tensor) in HF order: embeddings, then layer by layer, then the final norm and head."""
    pieces = _grouped_pieces(model)
    mappings = mappings_for(config)
    first = [m for m in mappings if m.megatron_key.startswith("embedding.")]
    per_layer = [m for m in mappings if m.per_layer]
    last = [m for m in mappings if m not in first and m not in per_layer]
    for mapping in first:
        yield from _named_hf(mapping, pieces, None, config, dtype)
    for layer in range(config.num_layers):
        for mapping in per_layer:
            yield from _named_hf(mapping, pieces, layer, config, dtype)
    for mapping in last:
        yield from _named_hf(mapping, pieces, None, config, dtype)


def _named_hf(mapping: TensorMapping, pieces, layer: int | None, config: ModelConfig, dtype: torch.dtype):
    full = _global_tensor(pieces[(mapping.megatron_key, () if layer is None else (layer,))])
    for name, tensor in zip(hf_names(mapping, layer), hf_from_megatron(mapping, full, config), strict=True):
        yield name, _finite_export(name, mapping.megatron_key, tensor, dtype)


def _finite_export(name: str, megatron_key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in the export dtype; a non-finite value (in the checkpoint, or an overflow of ``dtype``)
    is refused naming the tensor, so that no HF checkpoint that computes NaN is ever published."""
    exported = tensor.to(dtype).contiguous()
    if not _non_finite_count(exported):
        return exported
    in_source = _non_finite_count(tensor)
    where = f"{name!r} (Megatron {megatron_key!r})"
    if in_source:
        raise CheckpointError(
            f"{where} has {in_source} non-finite value(s) (NaN or inf) of {tensor.numel()} in the "
            "checkpoint: the weights are corrupt or come from a diverged run; export an earlier checkpoint"
        )
    raise CheckpointError(
        f"{where}: {_non_finite_count(exported)} value(s) overflow {dtype} to inf; export with "
        "--dtype float32 or --dtype bfloat16"
    )


def _write_safetensors_shards(named_tensors, directory: Path, max_shard_bytes: int) -> None:
    """``model-0000K-of-0000N.safetensors`` files of at most ``max_shard_bytes`` each (a bigger tensor gets
    a file of its own) and ``model.safetensors.index.json``, as transformers' ``save_pretrained`` writes."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes, total = [0], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        total += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    _write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


_RESPELLED_HF_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "head_dim")
"""Source config.json fields that export writes afresh: transformers 4 and 5 spell RoPE and dtype apart."""


def _export_hf_config(config: ModelConfig, source: dict[str, Any] | None, dtype: torch.dtype) -> dict:
    """``to_hf_config`` over the source config.json's other fields (token ids, ...), spelled as the
    installed transformers writes them; ``head_dim`` always, since Qwen3 reads a missing one as 128."""
    base = {k: v for k, v in (source or {}).items() if k not in _RESPELLED_HF_FIELDS}
    fields = {**base, **config.to_hf_config(), "head_dim": config.kv_channels}
    fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    return _as_transformers_writes(fields)


def _as_transformers_writes(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (transformers-4 spelling: ``rope_theta``, ``rope_scaling``, ``torch_dtype``) as the
    installed transformers' ``save_pretrained`` writes them: every version reads the old spelling, and
    transformers 5 rewrites it as ``rope_parameters`` and ``dtype``. Without transformers, as given."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return fields
    model_fields = {k: v for k, v in fields.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(fields["model_type"], **model_fields)
    return json.loads(hf_config.to_json_string(use_diff=True))


def _export_dtype(dtype: str | None, source: dict[str, Any] | None, model) -> torch.dtype:
    """The requested dtype, else the source checkpoint's, else the model's parameters' dtype."""
    name = dtype or (source or {}).get("dtype") or (source or {}).get("torch_dtype")
    if name is None:
        return next(model.parameters()).dtype
    if name not in _DTYPES:
        raise ValueError(f"export dtype {name!r} is not supported; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _write_hf_dir(model, config, directory: Path, out: Path, dtype_name, max_shard_bytes: int) -> None:
    """Rank 0: the whole HF directory into a staging sibling of ``out``, then published."""
    source_path = directory / SOURCE_HF_CONFIG
    source = _read_json(source_path, "") if source_path.is_file() else None
    dtype = _export_dtype(dtype_name, source, model)
    staging = out.parent / f".{out.name}.converting-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        hf_config = _export_hf_config(config, source, dtype)  # before the shards: it can refuse a field
        _write_safetensors_shards(_hf_tensors(model, config, dtype), staging, max_shard_bytes)
        _write_json(staging / HF_CONFIG, hf_config)
        _copy_side_files(directory, staging)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left over after a failure


def megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export Megatron weights (any saved layout) as an HF safetensors checkpoint directory; returns it.

    Collective over the default group (any size; the model is loaded at TP1 x PP1 on every rank and rank 0
    writes). ``dtype``: float32 / bfloat16 / float16; by default the source HF checkpoint's dtype when the
    directory came from ``hf_to_megatron``, else the parameters' dtype.
    """
    directory, config, out = check_export_inputs(ckpt_dir, out_dir, force, dtype)
    _require_distributed()
    model = _build_model(config, 1, 1).stage
    load_model_weights(directory, model, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    on_rank0(_write_hf_dir, model, config, directory, out, dtype, max_shard_bytes)
    logger.info("exported %s -> %s", directory, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Logits parity (HF transformers vs the converted Megatron model)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsComparison:
    """HF vs Megatron logits on the same tokens (true vocabulary only)."""

    max_abs_diff: float
    """max |logit_hf - logit_megatron| over every position and vocabulary entry."""
    top1_agreement: float
    """Fraction of positions whose argmax token is the same."""
    logits_std: float
    """Std of the HF logits: the scale ``max_abs_diff`` is to be read against."""
    num_positions: int
    hf_non_finite: int = 0
    """NaN / inf entries in the HF model's logits."""
    megatron_non_finite: int = 0
    """NaN / inf entries in the Megatron model's logits."""
    seq_len: int = 0
    """Positions per prompt (``num_positions / seq_len`` prompts)."""
    worst_position: int = 0
    """Position in its prompt of the largest difference: a RoPE error grows with the position."""


def verify_length(config: ModelConfig, seq_len: int | None = None) -> int:
    """Positions per verify prompt: ``seq_len`` if given, else ``max_position_embeddings`` capped at
    ``DEFAULT_VERIFY_SEQ_LEN``. RoPE errors (a dropped or wrong frequency scaling) grow with the position,
    so the check needs positions as far out as the model is used."""
    if seq_len is None:
        return min(config.max_position_embeddings, DEFAULT_VERIFY_SEQ_LEN)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"verify sequence length must be an integer >= 1; got {seq_len!r}")
    return seq_len


def prompt_tokens(
    vocab_size: int, seq_len: int, batch: int = DEFAULT_VERIFY_PROMPTS, seed: int = 0
) -> torch.Tensor:
    """Fixed pseudo-random token ids ``[batch, seq_len]``: a parity check needs no tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = model(tokens, positions, None)
    return output, lambda output_tensor, non_loss_data=False: output_tensor.detach().clone()


@torch.no_grad()
def _megatron_logits(placed: PlacedModel, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary fp32 CPU logits ``[B, S, vocab_size]`` on the last PP stage, None elsewhere."""
    from megatron_tropd.pipeline import run_microbatches
    from megatron_tropd.runtime import default_device

    tokens = tokens.to(default_device())
    outputs = run_microbatches(
        placed, _forward_step, [tokens], seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
        forward_only=True, collect_non_loss_data=True,
    )  # fmt: skip
    if not placed.is_last_stage:
        return None
    groups = placed.groups
    shard = outputs[0].contiguous()  # [B, S, padded_vocab / TP]
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(groups.tp_group))]
    dist.all_gather(shards, shard, group=groups.tp_group)
    return torch.cat(shards, dim=-1)[..., : placed.vocab_size].float().cpu()


@torch.no_grad()
def _hf_reference_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits ``[B, S, vocab]``, one prompt at a time (bounds the attention memory)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return torch.cat([hf_model(input_ids=prompt[None]).logits.float() for prompt in tokens])


def _compare_with_hf(hf_dir: Path, tokens: torch.Tensor, megatron: torch.Tensor) -> LogitsComparison:
    reference = _hf_reference_logits(hf_dir, tokens)
    per_position = (reference - megatron).abs().amax(dim=-1)  # [B, S]; NaN where either side is NaN
    return LogitsComparison(
        max_abs_diff=per_position.max().item(),
        top1_agreement=(reference.argmax(-1) == megatron.argmax(-1)).float().mean().item(),
        logits_std=reference.std().item(),
        num_positions=tokens.numel(),
        hf_non_finite=_non_finite_count(reference),
        megatron_non_finite=_non_finite_count(megatron),
        seq_len=tokens.shape[1],
        worst_position=int(per_position.nan_to_num(nan=float("inf")).argmax()) % tokens.shape[1],
    )


def compare_logits(
    hf_dir: str | os.PathLike,
    megatron_dir: str | os.PathLike,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    tokens: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> LogitsComparison:
    """Run the HF model (transformers, fp32) and the Megatron weights on a TP x PP layout on ``tokens``,
    by default ``DEFAULT_VERIFY_PROMPTS`` whole prompts of ``verify_length(config, seq_len)`` positions.

    Collective; every rank returns the same result. The HF model is loaded on the last rank only (a last
    PP stage), which compares it with the TP-gathered Megatron logits.
    """
    directory, config = read_megatron_config(megatron_dir)
    _require_distributed()
    placed = _build_model(config, tensor_parallel, pipeline_parallel)
    load_model_weights(directory, placed.stage, config)
    if tokens is None:
        tokens = prompt_tokens(config.vocab_size, verify_length(config, seq_len))
    megatron = _megatron_logits(placed, tokens)
    judge = dist.get_world_size() - 1
    outcome: list[Any] = [None]
    if dist.get_rank() == judge:
        try:
            outcome[0] = ("ok", _compare_with_hf(Path(hf_dir), tokens, megatron))
        except Exception as exc:  # told to every rank below, so none waits forever
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=judge)
    if outcome[0][0] == "error":
        raise RuntimeError(f"running the HF model from {hf_dir} failed: {outcome[0][1]}")
    return outcome[0][1]


# ---------------------------------------------------------------------------------------------------------
# Per-rank entry points (spawned by tools/convert.py, or run under torchrun)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A job's bad-input error, returned instead of raised: a spawned rank hands its parent only the
    traceback of an exception, and the command line must tell bad input (exit 2) from a crash."""

    message: str


def refusing_bad_input(rank: int, world_size: int, job, *job_args: Any) -> Any:
    """``job(rank, world_size, *job_args)``, or a ``Refusal`` when it raises ``ValueError`` (bad input).

    The conversion's collective checks raise the same error on every rank, naming the rank that found it,
    so rank 0's ``Refusal`` speaks for the job."""
    try:
        return job(rank, world_size, *job_args)
    except ValueError as exc:  # CheckpointError included
        return Refusal(str(exc))


def import_job(
    rank: int, world_size: int, hf_dir, out_dir, tensor_parallel: int, pipeline_parallel: int, force: bool,
    verify: bool, verify_seq_len: int | None = None,
) -> LogitsComparison | None:  # fmt: skip
    """``hf_to_megatron``, then (``verify``) the logits check of the output on the same layout."""
    del rank, world_size  # the run_on_ranks signature
    hf_to_megatron(hf_dir, out_dir, tensor_parallel, pipeline_parallel, force)
    if not verify:
        return None
    return compare_logits(hf_dir, out_dir, tensor_parallel, pipeline_parallel, seq_len=verify_seq_len)


def export_job(
    rank: int, world_size: int, ckpt_dir, out_dir, force: bool, dtype: str | None, verify: bool,
    verify_seq_len: int | None = None,
) -> LogitsComparison | None:  # fmt: skip
    """``megatron_to_hf``, then (``verify``) the logits check of the exported HF model against the source."""
    del rank, world_size
    megatron_to_hf(ckpt_dir, out_dir, force, dtype=dtype)
    return compare_logits(out_dir, ckpt_dir, seq_len=verify_seq_len) if verify else None
