"""The ``tropd`` command: ``tropd <command> [args]``.

Each command is a ``(help, add_arguments, run)`` entry in ``COMMANDS``; ``run`` imports what it needs
itself, so ``tropd version`` starts instantly and only the command you run pays for torch/Megatron.
Adding ``convert`` or ``eval`` is one function pair and one table row.
"""

from __future__ import annotations

import argparse
import platform as python_platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from megatron_tropd import __version__


@dataclass(frozen=True)
class Command:
    """One ``tropd`` subcommand."""

    help: str
    """One line shown by ``tropd --help``."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Declares the command's options on its subparser."""
    run: Callable[[argparse.Namespace], int]
    """Does the work; returns the process exit status."""
    forwards_argv: bool = False
    """Hand every argument after the command name (``--help`` included) to the command's own parser, as
    ``args.argv``. (Via ``parse_known_args``: ``nargs=REMAINDER`` rejects a leading ``--option``.)"""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def _run_demo(args: argparse.Namespace) -> int:
    from megatron_tropd.demo import run  # imports torch and Megatron: only when the demo is asked for

    return run.main(args.argv) or 0


def _run_train(args: argparse.Namespace) -> int:
    from megatron_tropd import train  # config only; torch loads once the config has been checked

    return train.main(args.argv)


def _run_eval(args: argparse.Namespace) -> int:
    from megatron_tropd.eval import command  # imports torch and Megatron: only when asked for

    return command.main(args.argv)


def _run_version(args: argparse.Namespace) -> int:
    del args
    print(f"megatron_tropd {__version__}")
    for distribution in ("torch", "megatron-core"):
        try:
            print(f"{distribution} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            print(f"{distribution} not installed")
    print(f"python {python_platform.python_version()}")
    return 0


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="distil a student on the built-in task on 2 CPU processes (2-6 min); `tropd demo --help`",
        add_arguments=_no_arguments,
        run=_run_demo,
        forwards_argv=True,
    ),
    "eval": Command(
        help="evaluate a checkpoint on benchmarks, or --compare earlier results (`tropd eval --help`)",
        add_arguments=_no_arguments,
        run=_run_eval,
        forwards_argv=True,
    ),
    "train": Command(
        help="train with a recipe: `tropd train --recipe <name> [key=value ...]` (`--help` for more)",
        add_arguments=_no_arguments,
        run=_run_train,
        forwards_argv=True,
    ),
    "version": Command(
        help="print the versions of megatron_tropd, torch, megatron-core and Python",
        add_arguments=_no_arguments,
        run=_run_version,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tropd", description="Trust-Region On-Policy Distillation.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, add_help=not command.forwards_argv)
        command.add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tropd`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if command.forwards_argv:
        args.argv = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
