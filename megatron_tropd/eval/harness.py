"""Evaluate a Megatron checkpoint on the benchmarks, on any TP x PP layout (data parallelism takes the rest).

``evaluate_checkpoint`` is collective over every rank of an initialised process group: the model is built
on its layout with ``placed.place_model`` (read-only weights, eval mode), the KV-cache engine generates, and
``eval.scoring.evaluate`` scores the responses. Every rank returns the same ``EvalReport``.

Everything that can be refused without a model -- an unreadable checkpoint, a tokenizer or benchmark
file that does not load, a prompt that does not fit in the context -- is checked first by
``prepare_evaluation``, which the command line also runs before it starts any rank.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tropd.checkpoint import CheckpointError, read_weights_config
from megatron_tropd.config import EvalSettings
from megatron_tropd.data import Tokenizer, encode_prompt
from megatron_tropd.eval.schema import Benchmark, load_benchmarks
from megatron_tropd.eval.scoring import EvalReport, Generate, evaluate, render_prompt
from megatron_tropd.model_config import ModelConfig
from megatron_tropd.placed import PlacedModel
from megatron_tropd.topology import ParallelLayout

DEFAULT_MAX_BATCH_SIZE = 64
"""Rows the KV-cache engine decodes at once (per data-parallel replica)."""

_EXPECTED = (
    "a directory written by save_model_weights or save_checkpoint, or a run root with a 'latest' marker"
)


def limit_prompts(benchmarks: Sequence[Benchmark], max_prompts: int) -> list[Benchmark]:
    """The first ``max_prompts`` items of each benchmark (all when 0)."""
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be >= 0 (0 = all), got {max_prompts}")
    if max_prompts == 0:
        return list(benchmarks)
    return [dataclasses.replace(b, items=b.items[:max_prompts]) for b in benchmarks]


def check_prompt_lengths(
    benchmarks: Sequence[Benchmark],
    tokenizer: Tokenizer,
    *,
    chat_template: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    raw_prompts: bool,
    max_new_tokens: int,
    context_length: int,
) -> None:
    """Refuse a prompt whose tokens (chat template applied, as ``TextGenerator`` sends it) plus
    ``max_new_tokens`` exceed the model's context, naming it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for benchmark in benchmarks:
        for item in benchmark.items:
            text = render_prompt(item, benchmark.family, raw_prompts)
            length = len(encode_prompt(text, chat_template, tokenizer, chat_template_kwargs))
            if length + max_new_tokens > context_length:
                raise ValueError(
                    f"benchmark {benchmark.name!r} item {item.id!r}: the prompt has {length} tokens and "
                    f"with max_new_tokens={max_new_tokens} needs {length + max_new_tokens} positions, but "
                    f"the model's context is {context_length} (max_position_embeddings): lower "
                    "max_new_tokens (--max-new-tokens, eval.max_new_tokens) or leave the item out"
                )


_BENCHMARKS_FIX = (
    "point --benchmarks (tropd eval) or eval.benchmarks (a training run) at the directory "
    "tools/prepare_benchmarks.py --out DIR writes"
)


def _read_benchmarks(benchmarks_dir: str | os.PathLike, names: Sequence[str] | None) -> list[Benchmark]:
    """``load_benchmarks``, with a missing directory, manifest or listed file refused as bad input
    (``ValueError`` naming the path) rather than surfacing as an ``OSError`` from deep in the reader."""
    directory = Path(benchmarks_dir)
    manifest = directory / "benchmarks.json"
    if not directory.is_dir():
        raise ValueError(f"benchmarks directory {directory} does not exist: {_BENCHMARKS_FIX}")
    if not manifest.is_file():
        raise ValueError(f"{manifest} does not exist ({directory} holds no benchmarks): {_BENCHMARKS_FIX}")
    try:
        return load_benchmarks(directory, list(names) if names else None)
    except FileNotFoundError as error:  # a benchmark file the manifest lists
        raise ValueError(
            f"benchmark file {error.filename}, listed in {manifest}, does not exist: restore it, or run "
            f"tools/prepare_benchmarks.py --out {directory} again, or {_BENCHMARKS_FIX}"
        ) from None


def load_checked_benchmarks(
    benchmarks_dir: str | os.PathLike,
    settings: EvalSettings,
    tokenizer: Tokenizer,
    *,
    chat_template: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    context_length: int,
) -> list[Benchmark]:
    """The benchmarks of ``benchmarks_dir`` (``settings.names`` or all), cut to ``settings.max_prompts``
    items each, with every prompt checked to fit the context (``check_prompt_lengths``)."""
    benchmarks = limit_prompts(_read_benchmarks(benchmarks_dir, settings.names or None), settings.max_prompts)
    check_prompt_lengths(
        benchmarks, tokenizer, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
        raw_prompts=settings.raw_prompts, max_new_tokens=settings.max_new_tokens,
        context_length=context_length,
    )  # fmt: skip
    return benchmarks


@dataclass
class PreparedEvaluation:
    """What ``prepare_evaluation`` checked and loaded; no model yet."""

    directory: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    benchmarks: list[Benchmark]


def prepare_evaluation(
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    benchmarks_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    chat_template: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    model_config: ModelConfig | None = None,
    world_size: int | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> PreparedEvaluation:
    """Check and load everything but the model (local, not collective); ValueError on bad input.
    ``settings`` None: ``EvalSettings()``, the shared defaults."""
    settings = settings or EvalSettings()
    directory, saved_config = read_weights_config(checkpoint)
    model_config = model_config or saved_config
    model_config.validate_parallel(tensor_parallel, pipeline_parallel)
    if world_size is not None:
        ParallelLayout(tensor_parallel, pipeline_parallel).data_parallel(world_size, "evaluated model")
    tokenizer = Tokenizer(str(tokenizer_path))
    benchmarks = load_checked_benchmarks(
        benchmarks_dir, settings, tokenizer, chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs, context_length=model_config.max_position_embeddings,
    )  # fmt: skip
    return PreparedEvaluation(directory, model_config, tokenizer, benchmarks)


def load_model(
    checkpoint: str | os.PathLike,
    model_config: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 0,
    params_dtype: torch.dtype | None = None,
) -> PlacedModel:
    """This rank's read-only stage of the checkpoint's model on a TP x PP layout (collective)."""
    from megatron_tropd.placed import one_model_groups, place_model

    groups = one_model_groups(tensor_parallel, pipeline_parallel, seed)
    try:
        return place_model(
            model_config, groups, weights=str(checkpoint), seed=seed, params_dtype=params_dtype
        )
    except CheckpointError:
        raise
    except Exception as exc:  # dist-checkpointing reports broken shards in its own terms
        raise CheckpointError(
            f"cannot load the weights of {checkpoint} ({type(exc).__name__}: {exc}); expected {_EXPECTED}"
        ) from exc


def pad_for_data_parallel(generate: Generate, data_parallel: int) -> Generate:
    """Repeat the last prompt until the requests split evenly over the replicas; drop the extras.

    Sampling is keyed by (seed, sample id, position), so the extra requests change no real response.
    """

    def padded(prompts: list[str], k: int, temperature: float) -> list[list[str]]:
        extra = next(e for e in range(data_parallel) if ((len(prompts) + e) * k) % data_parallel == 0)
        responses = generate(list(prompts) + [prompts[-1]] * extra, k, temperature)
        return responses[: len(prompts)]

    return padded


def build_generate(
    placed: PlacedModel,
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    chat_template: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    seed: int = 0,
    decoder: str = "auto",
) -> Generate:
    """``generate(prompts, k, temperature)`` over the KV-cache engine; collective over every rank."""
    from megatron_tropd.rollout.text import TextGenerator

    engine = placed.engine(placed.config.max_position_embeddings, max_batch_size, decoder)
    generator = TextGenerator(
        engine, tokenizer, max_new_tokens=max_new_tokens, chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs, seed=seed,
    )  # fmt: skip
    return pad_for_data_parallel(generator, placed.groups.data_parallel)


def _on_every_rank(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on every rank; when it fails anywhere, raise on every rank (none is left waiting in
    the next collective). User errors keep their type (``CheckpointError``, ``ValueError``)."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # shared below, then raised on every rank
        error = exc
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    failed = [(rank, found) for rank, found in enumerate(errors) if found is not None]
    if error is not None:
        raise error
    if failed:
        rank, (kind, message) = failed[0]
        known = {"CheckpointError": CheckpointError, "ValueError": ValueError}
        raise known.get(kind, RuntimeError)(f"on rank {rank}: {message}")
    return result


def _require_distributed() -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            "evaluate_checkpoint is collective: run it under torchrun, through tools/evaluate.py (which can "
            "spawn local ranks), or call megatron_tropd.runtime.init_distributed() first"
        )


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    benchmarks_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    chat_template: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    seed: int = 0,
    model_config: ModelConfig | None = None,
    decoder: str = "auto",
) -> EvalReport:
    """Generate ``settings.samples_per_prompt`` responses per benchmark prompt with the checkpoint's model
    and score them (``settings`` None: the shared defaults, ``EvalSettings()``).

    Collective over every rank of the initialised process group; every rank returns the same report.
    The model config comes from the checkpoint's metadata unless given. Bad input (checkpoint, tokenizer,
    benchmarks, a prompt longer than the context, a layout that does not divide the world) raises before
    any generation, on every rank alike.
    """
    _require_distributed()
    settings = settings or EvalSettings()
    prepared = _on_every_rank(
        prepare_evaluation, checkpoint, tokenizer_path, benchmarks_dir, settings,
        chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, model_config=model_config,
        world_size=dist.get_world_size(), tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
    )  # fmt: skip
    placed = load_model(
        prepared.directory, prepared.model_config, tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel, seed=seed,
    )  # fmt: skip
    generate = build_generate(
        placed, prepared.tokenizer, max_new_tokens=settings.max_new_tokens, chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs, max_batch_size=max_batch_size, seed=seed, decoder=decoder,
    )  # fmt: skip
    run = run_name or prepared.directory.name
    return evaluate(
        prepared.benchmarks, generate, settings.samples_per_prompt, settings.temperature, run=run,
        raw_prompts=settings.raw_prompts,
    )  # fmt: skip
