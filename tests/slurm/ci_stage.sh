#!/usr/bin/env bash
# The Slurm stage of .ci/run: install Slurm and munge, start a single-node cluster on this machine, run the
# integration tests (tests/slurm/test_slurm.py) against it, and stop the daemons it started, by PID, on
# any exit. Fails when a test fails and when none ran (all skipped or none collected).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cluster=tests/slurm/cluster.sh
export TROPD_SLURM_DIR="${TROPD_SLURM_DIR:-/tmp/tropd-slurm}"

bash "$cluster" install </dev/null
trap 'bash "$cluster" stop' EXIT
eval "$(bash "$cluster" start)"

log="$(mktemp)"
status=0
pytest -q -p no:cacheprovider --timeout=600 -rs -m slurm tests/slurm </dev/null 2>&1 | tee "$log" ||
    status="${PIPESTATUS[0]}"
if [ "$status" -ne 0 ]; then
    echo "ci: the Slurm integration tests failed (pytest status $status); logs in $TROPD_SLURM_DIR/log" >&2
    exit 1
fi
if grep -Eq '[0-9]+ skipped' "$log" || ! grep -Eq '[0-9]+ passed' "$log"; then
    echo "ci: the Slurm integration tests did not all run (skipped or none collected)" >&2
    exit 1
fi
rm -f "$log"
