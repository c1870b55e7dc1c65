"""``python -m megatron_tropd.train --recipe <name> [key=value ...]``: build, check, then train.

Order matters: the recipe is built, the overrides applied, the ``${VAR}`` paths resolved from the
environment and the whole config validated against the job's ``WORLD_SIZE`` *before* torch is imported or
any process group starts, so a typo or a layout that does not fit the job fails in a second, on every rank,
with a message that names the fix (exit status 2). Only then is ``megatron_tropd.trainer.run`` imported.

Signals (the contract ``slurm/tropd_8node.sh`` relies on): the trainer handles SIGUSR1 by saving a
checkpoint at the end of the current step and exiting with status 0; a requeued job resumes from the latest
checkpoint because ``checkpoint.resume`` is true by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from megatron_tropd.config import RunConfig
from megatron_tropd.overrides import apply_overrides, resolve_placeholders

logger = logging.getLogger(__name__)


def build_config(
    recipe: str, overrides: Sequence[str], environ: Mapping[str, str], *, strict_paths: bool = True
) -> RunConfig:
    """The recipe with ``overrides`` applied, ``${VAR}`` resolved and validated at ``environ["WORLD_SIZE"]``.

    Raises ``ValueError`` with the fix on any problem; does no I/O beyond reading ``environ``.
    """
    from recipes import get_recipe  # the recipes sit above the library in the dependency order

    config = apply_overrides(get_recipe(recipe), overrides)
    config = resolve_placeholders(config, environ, strict=strict_paths)
    config.validate(world_size=_world_size(environ))
    return config


def _world_size(environ: Mapping[str, str]) -> int | None:
    """``WORLD_SIZE`` from torchrun / srun; None outside a launcher (then only the config is checked)."""
    text = environ.get("WORLD_SIZE")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"WORLD_SIZE={text!r} in the environment is not a positive integer")
    return int(text)


def launch(recipe: str, overrides: Sequence[str] = ()) -> None:
    """Build and validate the run, then train; the function nemo-run's ``run.Partial`` wraps."""
    config = build_config(recipe, list(overrides), os.environ)
    from megatron_tropd import trainer  # torch and Megatron load only once the config is known to be good

    trainer.run(config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_tropd.train",
        description="Train with a named recipe; key.sub=value arguments override its fields.",
    )
    parser.add_argument("--recipe", help="recipe name (see --list)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-5 method.name=opd"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the checked config as JSON and exit"
    )
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a config error, before anything starts)."""
    args = _parser().parse_args(argv)
    if args.list:
        from recipes import RECIPES, WORLD_SIZES

        for name in RECIPES:
            print(f"{name}  (world size {WORLD_SIZES[name]})")
        return 0
    if not args.recipe:
        print("error: --recipe is required (see --list)", file=sys.stderr)
        return 2
    try:
        config = build_config(args.recipe, args.overrides, os.environ, strict_paths=not args.print_config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    from megatron_tropd import trainer

    trainer.run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
