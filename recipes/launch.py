"""Launch a recipe with nemo-run: on Slurm (torchrun per node) or locally (torchrun on this machine).

    python recipes/launch.py --recipe deepseek_math_tropd --executor slurm --account A --partition P \
        [--container-image IMG] [--mount /lustre:/lustre] [--dryrun | --detach] [key=value ...]
    python recipes/launch.py --recipe tiny_cpu --executor slurm --account A --partition P --nodes 1 \
        --gpus-per-node 0 --ntasks-per-node 2 --detach          # CPU ranks on a small cluster
    python recipes/launch.py --recipe tiny_cpu --executor local [--nproc 2] [key=value ...]

The task is ``run.Partial(megatron_tropd.train.launch, recipe=..., overrides=[...])``: every rank rebuilds
the config from its name and validates it before training, exactly like ``python -m megatron_tropd.train``.
The recipe is also validated here, at its intended world size, before anything is submitted. Ranks per
node are ``--ntasks-per-node`` (default: one per GPU of ``--gpus-per-node``); ``--gpus-per-node 0`` asks
Slurm for no GPU (gloo on CPU).

nemo-run writes the job's files (sbatch script, serialized task, logs) under
``<--job-dir>/experiments/<title>/<id>/`` and the job reads them from there, so ``--job-dir`` must be on
storage the compute nodes see. ``--detach`` returns once the job is submitted; without it the launcher
follows the job through ``sacct`` (which needs Slurm accounting).

Requeue: the executor asks Slurm for ``--requeue`` and nemo-run's script requeues a job that exits
non-zero up to ``retries`` times. On ``scontrol requeue``, pre-emption or ``scancel`` Slurm sends SIGTERM
to every process of the job, the trainer processes included: they save a checkpoint at the end of the
step and exit with status 75, so the requeued job resumes from that step. (Slurm's ``--signal`` warning
is not used on this path: torchrun's agent does not forward SIGUSR1 to its workers; for the time-limit
warning use ``slurm/tropd_8node.sh``, whose ranks are the trainer processes themselves.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import nemo_run as run

# Variables the paper recipes' ${VAR} paths use; forwarded to the job when set in the launching shell.
FORWARDED_ENV = ("TROPD_RUN_DIR", "TROPD_DATA_DIR", "TROPD_MODELS_DIR")
RANK_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def experiments_dir(job_dir: str) -> str:
    """Where ``run.Experiment(base_dir=job_dir)`` writes its jobs, and so where the tunnel must look."""
    return os.path.join(os.path.abspath(job_dir), "experiments")


def slurm_executor(
    nodes: int,
    gpus_per_node: int,
    account: str,
    partition: str,
    time: str,
    container_image: str | None,
    mounts: Sequence[str],
    job_dir: str,
    env_vars: dict[str, str] | None = None,
    retries: int = 3,
    ntasks_per_node: int | None = None,
) -> run.SlurmExecutor:
    """One torchrun agent per node starting ``ntasks_per_node`` ranks (default: one per GPU); exclusive
    nodes, requeue on failure. ``gpus_per_node=0`` asks for no GPU (CPU ranks)."""
    ranks = ntasks_per_node if ntasks_per_node is not None else gpus_per_node
    if ranks < 1:
        raise ValueError(
            f"no ranks per node: --gpus-per-node {gpus_per_node} and no --ntasks-per-node; "
            "pass --ntasks-per-node N to run N CPU ranks per node"
        )
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=ranks,  # with torchrun nemo-run turns this into --nproc-per-node
        gpus_per_node=gpus_per_node or None,  # None: no --gpus-per-node line, so no GPU is requested
        time=time,
        exclusive=True,
        additional_parameters={"requeue": True},
        retries=retries,
        container_image=container_image,
        container_mounts=list(mounts),
        launcher="torchrun",
        job_name_prefix="tropd-",
        packager=run.Packager(),  # the code is on shared storage / in the image; no git archive needed
        # The tunnel's job dir is the experiments dir the job files are written to (on this machine).
        tunnel=run.LocalTunnel(job_dir=experiments_dir(job_dir)),
        env_vars={**RANK_ENV, **(env_vars or {})},
    )


def local_executor(nproc: int, env_vars: dict[str, str] | None = None) -> run.LocalExecutor:
    """``nproc`` ranks on this machine through torchrun (gloo on CPU): the CI and laptop path."""
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=dict(env_vars or {}))


def training_task(
    recipe: str | None, overrides: Sequence[str], config_file: str | None = None
) -> run.Partial:
    """The function every rank runs: build, validate, train (``megatron_tropd.train.launch``).

    A config file travels as its absolute path: the ranks read it where the job runs (a shared file
    system, or a mount of the container)."""
    from megatron_tropd.train import launch

    extra = {"config_file": os.path.abspath(config_file)} if config_file else {}
    return run.Partial(launch, recipe=recipe, overrides=list(overrides), **extra)


def experiment_title(recipe: str) -> str:
    return f"tropd-{recipe}"


def render_sbatch(executor: run.SlurmExecutor, task: run.Partial, name: str, job_dir: str) -> str:
    """The sbatch script nemo-run would submit, rendered without a cluster (``run.Experiment`` minus sbatch).

    Like a real submission it writes the job's files (serialized task, sbatch script) where the job
    reads them, ``<job_dir>/experiments/<title>/<title>_dryrun/<name>/``; in a container the script refers
    to the task as ``/nemo_run/configs/<name>_fn_or_script``.
    """
    from nemo_run.run.torchx_backend.launcher import launch
    from nemo_run.run.torchx_backend.packaging import package

    title = experiment_title(name)
    experiment_id = f"{title}_dryrun"  # run.Experiment names its ids <title>_<timestamp>
    executor.assign(experiment_id, os.path.join(experiments_dir(job_dir), title, experiment_id), name, name)
    app_def = package(name=name, fn_or_script=task, executor=executor, serialize_to_file=True)
    _, info = launch(app_def, executor_name="slurm_tunnel", executor=executor, dryrun=True)
    return info.request.materialize()


def check_recipe(
    recipe: str | None, overrides: Sequence[str], world_size: int, config_file: str | None = None
) -> None:
    """Fail before submission if the recipe does not fit ``world_size`` ranks (``${VAR}`` left as is)."""
    from megatron_tropd.train import build_config

    environ = {"WORLD_SIZE": str(world_size)}
    build_config(recipe, overrides, environ, strict_paths=False, config_file=config_file)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Launch a megatron_tropd recipe with nemo-run.")
    parser.add_argument("--recipe", help="a recipe name or module:function (or give --config)")
    parser.add_argument("--config", metavar="FILE.yaml", help="a config file, on top of --recipe if given")
    parser.add_argument("--executor", choices=("slurm", "local"), required=True)
    parser.add_argument("--dryrun", action="store_true", help="print the job (sbatch script) and exit")
    parser.add_argument("--detach", action="store_true", help="return once the job is submitted")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU ranks (no GPU requested)")
    parser.add_argument(
        "--ntasks-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)"
    )
    parser.add_argument("--nproc", type=int, default=2, help="local ranks")
    parser.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT", ""))
    parser.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION", ""))
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--container-image", default=os.environ.get("CONTAINER_IMAGE"))
    parser.add_argument("--mount", action="append", default=[], help="src:dst, repeatable")
    parser.add_argument("--job-dir", default=os.path.join(os.getcwd(), "nemo_run_jobs"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def build_executor(args: argparse.Namespace) -> tuple[run.Executor, int]:
    """The executor asked for and the world size it gives."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if args.executor == "local":
        return local_executor(args.nproc, env_vars), args.nproc
    if not args.account or not args.partition:
        raise ValueError(
            "--executor slurm needs --account and --partition (or SBATCH_ACCOUNT/SBATCH_PARTITION)"
        )
    executor = slurm_executor(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        account=args.account,
        partition=args.partition,
        time=args.time,
        container_image=args.container_image,
        mounts=args.mount,
        job_dir=args.job_dir,
        env_vars=env_vars,
        ntasks_per_node=args.ntasks_per_node,
    )
    ranks_per_node = args.gpus_per_node if args.ntasks_per_node is None else args.ntasks_per_node
    return executor, args.nodes * ranks_per_node


def _job_name(recipe: str | None, config_file: str | None) -> str:
    """The recipe's name, else the config file's stem; nemo-run uses it in paths, so no ':' or dots."""
    name = recipe or os.path.splitext(os.path.basename(config_file or "tropd"))[0]
    return name.replace(":", "-").replace(".", "-")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        executor, world_size = build_executor(args)
        check_recipe(args.recipe, args.overrides, world_size, args.config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    task = training_task(args.recipe, args.overrides, args.config)
    name = _job_name(args.recipe, args.config)
    if args.dryrun and isinstance(executor, run.SlurmExecutor):
        print(render_sbatch(executor, task, name, args.job_dir))
        return 0
    with run.Experiment(experiment_title(name), base_dir=args.job_dir) as experiment:
        experiment.add(task, executor=executor, name=name)
        if args.dryrun:
            experiment.dryrun()  # prints the rendered job (the sbatch script for Slurm); submits nothing
        else:
            detach = args.detach and args.executor == "slurm"
            experiment.run(sequential=True, detach=detach, tail_logs=args.executor == "local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
