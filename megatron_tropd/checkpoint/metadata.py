"""``tropd_checkpoint.json``: what a checkpoint holds (step, loop state, model shape, layout, optimizer
format), read and checked before any tensor is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_tropd.checkpoint.atomic import write_text_durably
from megatron_tropd.checkpoint.errors import CheckpointError
from megatron_tropd.checkpoint.layout import CHECKPOINT_METADATA
from megatron_tropd.models import ModelConfig

FORMAT_VERSION = 1


def read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / CHECKPOINT_METADATA
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged (truncated or overwritten: {type(exc).__name__}: {exc}); restore it, or "
            "resume from an earlier step"
        ) from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is damaged: it holds a {type(metadata).__name__}, not a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format version {version}; this code reads version "
            f"{FORMAT_VERSION}: use the megatron_tropd release that wrote it"
        )
    return metadata


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Written last (durably): its presence marks the directory complete."""
    write_text_durably(directory / CHECKPOINT_METADATA, json.dumps(metadata, indent=1, sort_keys=True) + "\n")


def config_dict(model_config: ModelConfig) -> dict[str, Any]:
    """``ModelConfig`` as the JSON in the checkpoint holds it (nested dataclasses become dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(model_config)))


def check_model_config(saved: dict[str, Any], current: ModelConfig, directory: Path) -> None:
    """Refuse a checkpoint of another model shape, naming every differing field."""
    mine = config_dict(current)
    differing = sorted(set(saved) | set(mine), key=lambda name: (name not in mine, name))
    differing = [name for name in differing if saved.get(name) != mine.get(name)]
    if differing:
        details = "; ".join(
            f"{name}: checkpoint {saved.get(name)!r}, model {mine.get(name)!r}" for name in differing
        )
        raise CheckpointError(
            f"{directory} holds another model shape ({details}): build the model with the checkpoint's "
            f"ModelConfig (its '{CHECKPOINT_METADATA}' has it) or point to a checkpoint of this model"
        )
