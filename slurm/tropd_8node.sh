#!/bin/bash
# Run a megatron_tropd recipe on 8 nodes x 8 GPUs (one rank per GPU, launched by srun).
#
#   export SBATCH_ACCOUNT=<account> SBATCH_PARTITION=<partition>     # or pass -A/-p to sbatch
#   export TROPD_RUN_DIR=/shared/runs/deepseek_math_tropd TROPD_RECIPE=deepseek_math_tropd
#   export TROPD_DATA_DIR=... TROPD_MODELS_DIR=...                    # used by the paper recipes' paths
#   sbatch slurm/tropd_8node.sh [key=value ...]                       # or: bash slurm/tropd_8node.sh ...
#
# Optional: CONTAINER_IMAGE (pyxis/enroot) with CONTAINER_MOUNTS (comma-separated src:dst), TROPD_PYTHON,
# TROPD_CODE_DIR (the repository; default: where sbatch was called), TROPD_SITE_ENV (sourced by env.sh),
# TROPD_EXIT_WAIT_S (how long the step outlives its first exited rank; default 120).
#
# Signals and requeue (the contract of megatron_tropd.signals): on SIGUSR1 or SIGTERM each rank finishes
# its step, saves a checkpoint and exits with status 75; the requeued job resumes from that checkpoint
# (checkpoint.resume is true by default). Who sends what, and what this script does then:
#   - the time-limit warning (--signal=B:USR1@300, to this script only): USR1 is forwarded to the ranks
#     through srun; on their status 75 the script runs `scontrol requeue`.
#   - a signal sent to the steps only (`scancel --signal=USR1 JOBID`): the ranks get it directly; on their
#     status 75 the script runs `scontrol requeue` the same way.
#   - `scontrol requeue JOBID` or pre-emption: Slurm sends TERM to every process, waits KillWait seconds
#     (slurm.conf; the step and the save must fit), then requeues the job itself.
#   - a plain `scancel JOBID`: the same TERM; the ranks still save, and the job ends (CANCELLED).
# The script decides from the job in slurmctld (still RUNNING: it requeues; its restart count went up:
# Slurm requeues; else the job ends) and prints which. Any other rank status ends the job with it.
# CPU or small clusters: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/tropd_8node.sh
# (command-line options override the #SBATCH lines below; see the README).
#
#SBATCH --job-name=tropd
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --time=04:00:00
set -euo pipefail

fail() {  # a missing setting: say which and how to set it, exit 2 before anything starts
    echo "tropd: error: $*" >&2
    exit 2
}

require_env() {
    local name
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || fail "$name is not set; export $name=... (see the header of this script)"
    done
}

submit() {  # called outside an allocation: check what sbatch needs, then submit this same script
    require_env TROPD_RUN_DIR TROPD_RECIPE
    local how="export it, or submit with: sbatch -A <account> -p <partition> $0"
    [[ -n "${SBATCH_ACCOUNT:-}" ]] || fail "SBATCH_ACCOUNT is not set; $how"
    [[ -n "${SBATCH_PARTITION:-}" ]] || fail "SBATCH_PARTITION is not set; $how"
    TROPD_CODE_DIR="${TROPD_CODE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
    export TROPD_CODE_DIR
    mkdir -p "$TROPD_RUN_DIR/logs"
    exec sbatch --export=ALL --output="$TROPD_RUN_DIR/logs/slurm-%j.out" "$0" "$@"
}

rendezvous_env() {  # the first node hosts torch.distributed's store; the port is unique per job id
    # `|| true`: head exits after one line, so scontrol may die of SIGPIPE, which pipefail would make fatal.
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1 || true)"
    [[ -n "$MASTER_ADDR" ]] || fail "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    WORLD_SIZE="$SLURM_NTASKS"
    export MASTER_ADDR MASTER_PORT WORLD_SIZE
}

container_flags() {  # pyxis/enroot flags, one per line, only when CONTAINER_IMAGE is set
    [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
    local mounts="$TROPD_RUN_DIR:$TROPD_RUN_DIR,$TROPD_CODE_DIR:$TROPD_CODE_DIR"
    [[ -z "${CONTAINER_MOUNTS:-}" ]] || mounts="$mounts,$CONTAINER_MOUNTS"
    printf '%s\n' "--container-image=$CONTAINER_IMAGE" "--container-mounts=$mounts" \
        "--container-workdir=$TROPD_CODE_DIR"
}

# Each task turns its SLURM_* variables into torch.distributed's, then *execs* python so that the signals
# srun forwards reach the trainer itself, not a shell.
# shellcheck disable=SC2016  # expanded by each rank's bash, not here
RANK_COMMAND='export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
exec "${TROPD_PYTHON:-python}" -m megatron_tropd.train --recipe "$TROPD_RECIPE" "$@"'

REQUEUE_EXIT_CODE=75 # a rank's status after saving a checkpoint on a signal (megatron_tropd.signals)
srun_pid=""
restarts_at_start=0

on_signal() { # forward to every rank through srun; srun relays USR1 to its tasks
    echo "tropd: SIG$1: asking the ranks to checkpoint at the end of their step (SIGUSR1)" >&2
    [[ -z "$srun_pid" ]] || kill -USR1 "$srun_pid" 2>/dev/null || true
}

job_field() { # job_field NAME: a field of `scontrol show job` for this job (JobState, Restarts, ...)
    local line
    line="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null || true)"
    if [[ " $line " =~ \ $1=([^ ]*)\  ]]; then echo "${BASH_REMATCH[1]}"; else echo UNKNOWN; fi
}

requeue_after_checkpoint() { # the ranks saved and asked to be resumed: requeue unless Slurm decided
    local state restarts output
    state="$(job_field JobState)" restarts="$(job_field Restarts)"
    if [[ "$state" == RUNNING ]]; then # our own warning, or a signal sent to the steps only
        if output="$(scontrol requeue "$SLURM_JOB_ID" 2>&1)"; then
            echo "tropd: checkpoint saved; job $SLURM_JOB_ID requeued: it resumes from that checkpoint" >&2
            exit 0
        fi
        echo "tropd: checkpoint saved, but \`scontrol requeue $SLURM_JOB_ID\` failed: $output;" \
            "the job ends here (resubmit to resume)" >&2
        exit "$REQUEUE_EXIT_CODE"
    fi
    # Ending either way (COMPLETING): Slurm counts a requeue (scontrol requeue, pre-emption) at once.
    if [[ "$restarts" =~ ^[0-9]+$ ]] && ((restarts > restarts_at_start)); then
        echo "tropd: checkpoint saved; Slurm is requeueing job $SLURM_JOB_ID (restart $restarts)" >&2
    else
        echo "tropd: checkpoint saved; job $SLURM_JOB_ID is ending ($state, cancelled or out of time)," \
            "not requeued" >&2
    fi
    exit 0
}

launch_ranks() {
    local flags=()
    mapfile -t flags < <(container_flags)
    mkdir -p "$TROPD_RUN_DIR/logs"
    # Not --kill-on-bad-exit: a rank that exits 75 after the save would get the others killed while they
    # finish theirs. --wait ends the step that long after the first rank exits (a crashed rank's peers).
    srun --kill-on-bad-exit=0 --wait="${TROPD_EXIT_WAIT_S:-120}" --nodes="$SLURM_NNODES" --ntasks-per-node="$SLURM_NTASKS_PER_NODE" \
        --chdir="$TROPD_CODE_DIR" --output="$TROPD_RUN_DIR/logs/$SLURM_JOB_ID.rank%t.log" --open-mode=append \
        "${flags[@]}" \
        bash -c "$RANK_COMMAND" tropd-rank "$@" &
    srun_pid=$!
}

wait_for_ranks() {  # `wait` returns early when a trapped signal arrives; keep waiting for srun itself
    local status
    while true; do
        status=0
        wait "$srun_pid" || status=$?
        if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then
            continue
        fi
        return "$status"
    done
}

main() {
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        submit "$@"
    fi
    require_env TROPD_RUN_DIR TROPD_RECIPE SLURM_JOB_NODELIST SLURM_NNODES SLURM_NTASKS SLURM_NTASKS_PER_NODE
    TROPD_CODE_DIR="${TROPD_CODE_DIR:-${SLURM_SUBMIT_DIR:-}}"
    [[ -f "$TROPD_CODE_DIR/slurm/env.sh" ]] ||
        fail "TROPD_CODE_DIR='$TROPD_CODE_DIR' is not the repository; submit from it or export TROPD_CODE_DIR"
    export TROPD_CODE_DIR TROPD_RUN_DIR TROPD_RECIPE
    # shellcheck source=slurm/env.sh
    source "$TROPD_CODE_DIR/slurm/env.sh"
    rendezvous_env
    restarts_at_start="$(job_field Restarts)"
    [[ "$restarts_at_start" =~ ^[0-9]+$ ]] || restarts_at_start=0
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    echo "tropd: job $SLURM_JOB_ID: recipe $TROPD_RECIPE on $SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE" \
        "ranks, master $MASTER_ADDR:$MASTER_PORT, run dir $TROPD_RUN_DIR" >&2
    launch_ranks checkpoint.save_dir="$TROPD_RUN_DIR" "$@"
    local status=0
    wait_for_ranks || status=$?
    if ((status == REQUEUE_EXIT_CODE)); then
        requeue_after_checkpoint
    fi
    echo "tropd: ranks exited with status $status" >&2
    exit "$status"
}

main "$@"
