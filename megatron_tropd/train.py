"""``python -m megatron_tropd.train --recipe <name> [--config run.yaml] [key=value ...]``: build, check,
then train.

Order matters: the recipe is built (a name, or ``module:function``), the YAML file applied on top
(``megatron_tropd.config_file``), the overrides applied, the ``${VAR}`` paths resolved from the
environment and the whole config validated against the job's ``WORLD_SIZE`` *before* torch is imported or
any process group starts, so a typo or a layout that does not fit the job fails in a second, on every rank,
with a message that names the fix (exit status 2). Then ``megatron_tropd.preflight`` reads the input files
(prompts, tokenizer, evaluation benchmarks) and refuses a bad one the same way, still before any process
group exists; each error is printed once, by rank 0. Only then is ``megatron_tropd.trainer.run`` imported.

Signals (the contract ``slurm/tropd_8node.sh`` relies on, see ``megatron_tropd.signals``): SIGUSR1 and
SIGTERM are handled from the first line of ``main``, before torch loads. The trainer saves a checkpoint at
the end of the current step (a signal during set-up waits for the end of the first step) and every rank
exits with status 75 (``REQUEUE_EXIT_CODE``; 0 when that step was the last one). A requeued job resumes
from the latest checkpoint because ``checkpoint.resume`` is ``auto`` by default. Each rank dies with its
launcher (parent-death signal), and rank 0 holds ``<checkpoint.save_dir>/run.lock`` for the whole run: a
second live job on the same checkpoint root is refused with exit status 2 (``megatron_tropd.run_lock``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from megatron_tropd import run_lock
from megatron_tropd.config import RunConfig
from megatron_tropd.config_file import compose, load_recipe, to_yaml
from megatron_tropd.overrides import apply_overrides, resolve_placeholders
from megatron_tropd.preflight import preflight_status, report_error
from megatron_tropd.signals import StopSignals, set_parent_death_signal

logger = logging.getLogger(__name__)


def build_config(
    recipe: str | None,
    overrides: Sequence[str],
    environ: Mapping[str, str],
    *,
    strict_paths: bool = True,
    config_file: str | os.PathLike | None = None,
) -> RunConfig:
    """The recipe (a name or ``module:function``) and/or the YAML ``config_file`` on top of it, with
    ``overrides`` applied, ``${VAR}`` resolved and validated at ``environ["WORLD_SIZE"]``.

    Raises ``ValueError`` with the fix on any problem; reads only ``environ`` and the config files.
    """
    from recipes import get_recipe  # the recipes sit above the library in the dependency order

    if recipe is None and config_file is None:
        raise ValueError("give --recipe NAME (see --list), --config FILE.yaml, or both")
    config = load_recipe(recipe, get_recipe) if recipe is not None else None
    if config_file is not None:
        config = compose(config_file, get_recipe, base=config)
    config = apply_overrides(config, overrides)
    config = resolve_placeholders(config, environ, strict=strict_paths).resolved()
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


def _start_rank(environ: Mapping[str, str] = os.environ) -> None:
    """First thing on a launched rank (``LOCAL_RANK`` set by torchrun or the Slurm script): die with the
    launcher, and defer stop signals to the training loop. In-process callers keep their own handlers."""
    if "LOCAL_RANK" in environ:
        set_parent_death_signal()
        StopSignals.install()


def _train(config: RunConfig) -> int:
    """Train; the exit status of the signal contract (0, or 75 to be requeued)."""
    from megatron_tropd import trainer  # torch and Megatron load only once the config is known to be good

    trainer.run(config)  # rank 0 takes the run lock before any process group starts
    return StopSignals.install().exit_status()


def launch(recipe: str | None, overrides: Sequence[str] = (), config_file: str | None = None) -> None:
    """Build and validate the run, then train; the function nemo-run's ``run.Partial`` wraps.

    Exits (``SystemExit``) with status 75 when the run stopped on a signal, 2 when the run lock is held.
    """
    _start_rank()
    config = build_config(recipe, list(overrides), os.environ, config_file=config_file)
    if preflight_status(config):  # input files, before any process group; rank 0 printed the problem
        raise SystemExit(2)
    try:
        status = _train(config)
    except run_lock.RunLockError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_tropd.train",
        description="Train with a named recipe; key.sub=value arguments override its fields.",
    )
    parser.add_argument("--recipe", help="recipe name (see --list), or module:function of your own")
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="a full or partial config (with defaults:), on top of --recipe"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="e.g. optim.lr=1e-5 eval.names=[AIME24,AIME25] +data.chat_template_kwargs.x=1 ~optim.lr",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the checked config and exit")
    parser.add_argument(
        "--format", choices=("json", "yaml"), default="json", help="of --print-config (default json)"
    )
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a config error or a held run lock, before anything
    starts, and for a checkpoint refused at resume; 75 when the run stopped on a signal after saving)."""
    _start_rank()
    args = _parser().parse_args(argv)
    if args.list:
        from recipes import RECIPES, WORLD_SIZES

        for name in RECIPES:
            print(f"{name}  (world size {WORLD_SIZES[name]})")
        return 0
    if not args.recipe and not args.config:
        print("error: --recipe or --config is required (see --list)", file=sys.stderr)
        return 2
    try:
        config = build_config(
            args.recipe,
            args.overrides,
            os.environ,
            strict_paths=not args.print_config,
            config_file=args.config,
        )
    except ValueError as error:
        report_error(error)  # rank 0 only: one message per job
        return 2
    if args.print_config:
        print(to_yaml(config) if args.format == "yaml" else json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    if preflight_status(config):  # input files, before any process group; rank 0 printed the problem
        return 2
    try:
        return _train(config)
    except run_lock.RunLockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a checkpoint refused at resume is bad input too; anything else is a bug
        if not _is_checkpoint_error(error):
            raise
        report_error(error)  # every rank raised the same error (decided once, shared); rank 0 reports
        return 2


def _is_checkpoint_error(error: Exception) -> bool:
    """``checkpoint.CheckpointError``, checked without importing torch when it was never loaded."""
    module = sys.modules.get("megatron_tropd.checkpoint")
    return module is not None and isinstance(error, module.CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
