#!/bin/bash
# Run a megatron_tropd recipe on 1 node x 8 GPUs: the same job as slurm/tropd_8node.sh (read its header
# for the variables, the signal/requeue contract and the logs), with a one-node allocation.
#
#   sbatch slurm/tropd_1node.sh [key=value ...]     # or: bash slurm/tropd_1node.sh [key=value ...]
#
#SBATCH --job-name=tropd-1node
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --time=04:00:00
set -euo pipefail

# Under sbatch this file runs from Slurm's spool directory, so the repository is found from
# TROPD_CODE_DIR (set at submission) or the directory sbatch was called from. Sourcing keeps $0 = this
# file, so a direct `bash slurm/tropd_1node.sh` submits the one-node header.
code_dir="${TROPD_CODE_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# shellcheck source=slurm/tropd_8node.sh
source "$code_dir/slurm/tropd_8node.sh"
