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
# One rank per GPU: keep each rank's CPU threads from oversubscribing the node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1

if [[ -n "${TROPD_SITE_ENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$TROPD_SITE_ENV"
fi
