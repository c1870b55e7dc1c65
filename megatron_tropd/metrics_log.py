"""Step and evaluation metrics of a run, written by its reporting rank.

Every record goes to ``run_dir/metrics.jsonl``, to TensorBoard (``logging.tensorboard``, event files in
``run_dir/tensorboard``; one warning when it cannot start) and to Weights & Biases (``logging.wandb_project``,
with ``wandb_name``, ``wandb_entity`` and ``wandb_tags``); the console gets a progress bar when stdout is a
terminal, else a log line every ``logging.log_interval`` steps. Evaluation scores are keys ``eval/<name>``
of any record, or records of their own (``write_eval``); they are plotted like every other number.

``metrics.jsonl`` is strict JSON, one object a line: a NaN or infinite value (the mean of a metric that
saw no token, the grad norm of a skipped non-finite update) is written as ``null``. A run resumed at
step ``s`` first drops the rows it will write again (training rows of step ``s`` on, evaluation rows
after ``s``), so every step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_tropd.config import LoggingConfig, RunConfig
from megatron_tropd.records import StepRecord

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
# The run's W&B id, kept in the run directory so that a resumed job continues the same W&B run.
WANDB_ID_FILE = "wandb_id"
# Sinks already warned about in this process: a missing sink is said once, not once per run.
_WARNED: set[str] = set()
LINE_KEYS = ("loss", "trust_fraction", "p_trust", "teacher_topk_mass", "grad_norm", "response_length")
BAR_KEYS = ("loss", "trust_fraction", "response_length")


def numeric_items(record: dict) -> dict[str, float]:
    """The record's numbers other than its step: what TensorBoard and W&B plot."""
    return {
        name: value
        for name, value in record.items()
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _eval_name(name: str) -> str:
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def eval_record(step: int, scores: dict[str, float]) -> dict:
    """``{"step": step, "eval/<name>": score, ...}``; names already under ``eval/`` keep their name."""
    return {"step": step, **{_eval_name(name): float(score) for name, score in scores.items()}}


def _eval_items(record: dict) -> dict:
    return {name: value for name, value in record.items() if name.startswith(EVAL_PREFIX)}


def _is_training_record(record: dict) -> bool:
    """A record of a training step (not only evaluation scores): it advances the progress bar."""
    return any(name != "step" and not name.startswith(EVAL_PREFIX) for name in record)


def strict_json_line(record: dict) -> str:
    """``record`` as one line of strict JSON, NaN and infinities written as ``null``."""
    finite = {
        name: None if isinstance(value, float) and not math.isfinite(value) else value
        for name, value in record.items()
    }
    return json.dumps(finite, allow_nan=False)


def _rerun_by_resume(record: dict, start_step: int) -> bool:
    """A row a run resumed at ``start_step`` writes again: a training row of a step from
    ``start_step`` on, or an evaluation row after it (an evaluation at ``start_step`` ran before the save)."""
    step = record.get("step", -1)
    return step >= start_step if _is_training_record(record) else step > start_step


def drop_rerun_rows(path: Path, start_step: int) -> None:
    """Rewrite ``path`` without the rows a resume at ``start_step`` writes again (temp file, then
    ``os.replace``, so a crash leaves the old file or the new one)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and not _rerun_by_resume(json.loads(line), start_step)]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _format(values: dict, keys) -> str:
    return "  ".join(f"{key}={values[key]:.4g}" for key in keys if key in values)


def import_wandb():
    """W&B is optional; a configured project without it must fail before any training step."""
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError(
            "logging.wandb_project is set but wandb is not installed: `pip install wandb` "
            "(or `pip install -e .[wandb]`), or clear logging.wandb_project"
        ) from error
    return wandb


def _wandb_run_id(run_dir: Path) -> str:
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def _warn_once(key: str, message: str, *args: Any) -> None:
    """``logger.warning`` the first time ``key`` comes up in this process (which may hold several runs)."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        _warn_once(
            "tensorboard",
            "logging.tensorboard is on but TensorBoard cannot start (%s): metrics go to metrics.jsonl only. "
            "Install it (`pip install tensorboard`, a dependency of megatron-tropd) or set "
            "logging.tensorboard=false",
            error,
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _wandb_init(wandb, run_dir: Path, logging_config: LoggingConfig, run_name: str, config_dict: dict | None):
    """Start (or, with the id kept in ``run_dir``, continue) the run's W&B run."""
    return wandb.init(
        project=logging_config.wandb_project, entity=logging_config.wandb_entity or None,
        name=logging_config.wandb_name or run_name or None, tags=list(logging_config.wandb_tags) or None,
        dir=str(run_dir), config=config_dict or {}, resume="allow", id=_wandb_run_id(run_dir),
    )  # fmt: skip


class MetricsLog:
    """The run's metric sinks; every method is a no-op on ranks other than the reporting one."""

    def __init__(
        self,
        run_dir: str | Path,
        logging_config: LoggingConfig,
        *,
        active: bool,
        total_steps: int,
        start_step: int = 0,
        run_name: str = "",
        config_dict: dict[str, Any] | None = None,
        progress_bar: bool | None = None,
    ):
        """``progress_bar=None`` shows the bar exactly when stdout is a terminal."""
        self.active = active
        self.run_dir = Path(run_dir)
        self.log_interval = logging_config.log_interval
        self.total_steps = total_steps
        self.jsonl = self.writer = self.bar = self.wandb_run = None
        # Every rank checks, so that a missing wandb stops the whole job rather than one rank of it.
        wandb = import_wandb() if logging_config.wandb_project else None
        if not active:
            return
        # The reporting rank can be a later pipeline stage, whose other INFO lines configure_console hides.
        logger.setLevel(logging.INFO)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            drop_rerun_rows(self.run_dir / "metrics.jsonl", start_step)
        self.jsonl = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if logging_config.tensorboard:
            self.writer = _tensorboard_writer(self.run_dir)
        if wandb is not None:
            self.wandb_run = _wandb_init(wandb, self.run_dir, logging_config, run_name, config_dict)
        if progress_bar if progress_bar is not None else sys.stdout.isatty():
            self.bar = self._progress_bar(run_name, start_step)

    @classmethod
    def for_run(
        cls, config: RunConfig, run_dir: str | Path, *, active: bool, start_step: int = 0
    ) -> MetricsLog:
        """The log of the run ``config`` in ``run_dir``; ``active`` on the reporting rank only."""
        config_dict = json.loads(json.dumps(asdict(config), default=str))  # what config.json holds
        return cls(
            run_dir, config.logging, active=active, total_steps=config.train_steps,
            start_step=start_step, run_name=config.name, config_dict=config_dict,
        )  # fmt: skip

    def _progress_bar(self, run_name: str, start_step: int):
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=start_step, desc=run_name or None, unit="step",
            file=sys.stdout, dynamic_ncols=True,
        )  # fmt: skip

    def write(self, record: dict) -> None:
        """One record (``record["step"]`` required) to every sink."""
        if not self.active:
            return
        self.jsonl.write(strict_json_line(record) + "\n")
        self.jsonl.flush()
        numbers = numeric_items(record)
        if self.writer is not None:
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=record["step"])
        self._console(record)

    def write_step(self, record: StepRecord) -> None:
        """A training step's record (its ``row()``) to every sink."""
        self.write(record.row())

    def write_eval(self, step: int, scores: dict[str, float]) -> None:
        """Evaluation scores at ``step`` as a record ``{"step": step, "eval/<name>": score, ...}``."""
        self.write(eval_record(step, scores))

    def _line_due(self, step: int) -> bool:
        done = step + 1
        return done % self.log_interval == 0 or done == self.total_steps

    def _console(self, record: dict) -> None:
        step, scores = record["step"], _eval_items(record)
        due = _is_training_record(record) and self._line_due(step)
        if self.bar is None:
            if due or scores:
                keys = (LINE_KEYS if due else ()) + tuple(scores)
                logger.info("step %d  %s", step, _format(record, keys))
            return
        if scores:
            self.bar.write(f"step {step}  {_format(scores, scores)}")
        if _is_training_record(record):
            if due:
                postfix = {key: f"{record[key]:.4g}" for key in BAR_KEYS if key in record}
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(max(0, step + 1 - self.bar.n))

    def close(self) -> None:
        """Flush and close every sink (finishes the W&B run); safe to call more than once."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.jsonl is not None:
            self.jsonl.close()
        self.jsonl = self.writer = self.bar = self.wandb_run = None
