# shellcheck shell=bash
# Environment shared by every rank of a megatron_tropd Slurm job; sourced by slurm/tropd_*node.sh.
# Site-specific values (InfiniBand HCAs, socket interface) belong in TROPD_SITE_ENV, sourced last.

# NCCL: fail loudly instead of hanging, and let a stuck collective time out so requeue can kick in.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
# Megatron overlaps TP communication with compute only when the kernel queue is serialised.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Each rank's CPU threads: its share of the node's allocated cores, so ranks do not oversubscribe them:
# SLURM_CPUS_PER_TASK when the job asked for --cpus-per-task, else the node's CPUs / its ranks.
omp_threads() {
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        echo "$SLURM_CPUS_PER_TASK"
        return
    fi
    local cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}" ranks="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
    ranks="${ranks%%(*}" # "8(x2)" on heterogeneous allocations: the first node's count
    local threads=$((cpus / (ranks > 0 ? ranks : 1)))
    echo $((threads > 0 ? threads : 1))
}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(omp_threads)}"
export PYTHONUNBUFFERED=1

if [[ -n "${TROPD_SITE_ENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$TROPD_SITE_ENV"
fi
