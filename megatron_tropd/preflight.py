"""Checks of a run's inputs that need files but no process group, run before torch.distributed starts.

``python -m megatron_tropd.train`` calls ``preflight_status(config)`` right after the config is built and
validated: a run directory or ``checkpoints/`` that cannot take files, a checkpoint that must be resumed
but is not there (or a ``latest`` marker naming nothing usable), a missing or unreadable prompt file, a
line that is not JSON or lacks its field, a token id outside the models' vocabulary, a file with no usable
prompt, a tokenizer that does not load or the in-loop evaluation's benchmarks are found here, in a second,
instead of after both models exist. Every rank runs the same checks on its own (no process group exists
yet) and finds the same problem; only rank 0 prints it (``RANK`` unset or "0"), and every rank exits with
status 2.

``check_run_inputs`` is the list of checks: each raises ``ValueError`` naming the file, the line or field,
and the fix.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from megatron_tropd.config import RunConfig


def check_data_inputs(config: RunConfig) -> None:
    """The tokenizer loads, every training prompt is usable (``data.load_run_prompts``: schema, ids in
    ``[0, student.vocab_size)``, length, at least one kept) and, with ``eval.interval > 0``, the
    held-out benchmarks load and fit the student's context."""
    from megatron_tropd.data import load_run_prompts, run_tokenizer

    if not config.data.train_prompts:
        raise ValueError("data.train_prompts is empty: point it at a JSONL or parquet prompt file")
    tokenizer = run_tokenizer(config)
    load_run_prompts(config, tokenizer)
    if config.eval.interval:
        _check_eval_benchmarks(config, tokenizer)


def _check_eval_benchmarks(config: RunConfig, tokenizer) -> None:
    from megatron_tropd.eval.harness import load_checked_benchmarks

    e = config.eval
    if tokenizer is None:
        raise ValueError("eval.interval > 0 needs data.tokenizer: the benchmarks are text")
    try:
        load_checked_benchmarks(
            e.benchmarks, e.settings, tokenizer, chat_template=config.data.chat_template,
            chat_template_kwargs=config.data.chat_template_kwargs,
            context_length=config.student.max_position_embeddings,
        )  # fmt: skip
    except OSError as error:  # a benchmark file that is missing or unreadable
        raise ValueError(f"eval.benchmarks={e.benchmarks!r}: {error}") from None


def _check_writable_dir(path: Path, key: str) -> None:
    """``path`` is, or can be made, a directory this process creates files in; nothing is created here
    (an existing directory gets a probe file, removed at once)."""
    fix = f"point {key} at a writable directory on storage every node can reach"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}: {existing} is a file, so {path} cannot be a directory; {fix}")
    if existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{key}: {path} cannot be created ({existing} is not writable); {fix}")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tropd-write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{key}: cannot write into {path} ({error.strerror or error}); {fix}") from None


def check_run_dir(config: RunConfig) -> None:
    """The run directory and its ``checkpoints/`` take files (a first save would fail there after
    ``checkpoint.save_interval`` steps of work), and the checkpoint to resume is there when it must be."""
    run_dir = Path(config.checkpoint.save_dir)
    _check_writable_dir(run_dir, "checkpoint.save_dir")
    _check_writable_dir(run_dir / "checkpoints", "checkpoint.save_dir")
    _check_resumable(config, run_dir / "checkpoints")


def _check_resumable(config: RunConfig, root: Path) -> None:
    """What ``latest`` names can be known from the files: a marker naming nothing usable stops the run
    here (unless ``checkpoint.on_damaged=previous`` may fall back), and ``resume=required`` needs one."""
    from megatron_tropd.checkpoint import CheckpointError, latest_checkpoint

    resume, on_damaged = config.checkpoint.resume, config.checkpoint.on_damaged
    if resume == "never":
        return
    try:
        found = latest_checkpoint(root)
    except CheckpointError:
        if on_damaged == "fail":
            raise
        return  # the resume looks for the newest intact step
    if found is None and resume == "required":
        raise ValueError(
            f"checkpoint.resume=required but {root} holds no checkpoint: check checkpoint.save_dir (a typo "
            "starts a new run elsewhere), or use checkpoint.resume=auto to start from scratch"
        )


def check_run_inputs(config: RunConfig) -> None:
    """Every pre-flight check, in order; the first problem raises ``ValueError``."""
    check_run_dir(config)
    check_data_inputs(config)


def is_reporting_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of a launched job, or a process outside any launcher (``RANK`` unset)."""
    return environ.get("RANK", "0") == "0"


def report_error(error: Exception, environ: Mapping[str, str] = os.environ) -> None:
    """``error: ...`` on stderr from the reporting rank only: one message per job, not one per rank."""
    if is_reporting_rank(environ):
        print(f"error: {error}", file=sys.stderr, flush=True)


def preflight_status(config: RunConfig, environ: Mapping[str, str] = os.environ) -> int:
    """0 when every input checks out; otherwise 2, after rank 0 printed the problem."""
    try:
        check_run_inputs(config)
    except ValueError as error:
        report_error(error, environ)
        return 2
    return 0
