#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the integration tests in tests/slurm/.
#
#   tests/slurm/cluster.sh install        # apt-get install slurm-wlm munge (Debian/Ubuntu, as root)
#   eval "$(tests/slurm/cluster.sh start)" # start munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   pytest -q -m slurm tests/slurm        # the tests find the cluster through SLURM_CONF
#   tests/slurm/cluster.sh stop           # stop the daemons this script started, by their PIDs
#
# Everything lives in TROPD_SLURM_DIR (default /tmp/tropd-slurm): slurm.conf, the daemons' state, logs and
# PID files. No accounting daemon; proctrack/linuxproc and task/none need no cgroups, so it runs in a
# container. The daemons run as root (the tests submit as root). KillWait is long enough for the trainer
# to finish its step and save after Slurm's SIGTERM.
set -euo pipefail

dir="${TROPD_SLURM_DIR:-/tmp/tropd-slurm}"
conf="$dir/slurm.conf"

say() { echo "cluster: $*" >&2; }

install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
}

write_conf() {
    local host cpus memory
    host="$(hostname -s)"
    cpus="$(nproc)"
    ((cpus >= 2)) || cpus=2 # the tests run 2 ranks; config_overrides lets the node declare more than it has
    memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$conf" <<EOF
ClusterName=tropd-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${TROPD_SLURMCTLD_PORT:-6817}
SlurmdPort=${TROPD_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=60
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null >/dev/null 2>&1; then
        say "munged already running; using it"
        return
    fi
    [[ -f /etc/munge/munge.key ]] || (umask 077 && mungekey --create --keyfile=/etc/munge/munge.key)
    chown munge:munge /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$dir/munged.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
    local seconds="$1" what="$2"
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "$what did not come up in ${seconds}s; logs in $dir/log"
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

node_idle() {
    sinfo -h -N -o %t | grep -qx idle
}

start() {
    command -v slurmctld >/dev/null || { say "slurmctld not found; run: $0 install"; exit 2; }
    if [[ -f "$dir/slurmctld.pid" ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        say "already running (state in $dir)"
    else
        rm -rf "$dir"
        write_conf
        start_munged
        export SLURM_CONF="$conf"
        slurmctld -f "$conf" -i
        wait_for 30 slurmctld scontrol ping
        slurmd -f "$conf"
        wait_for 60 "the node" node_idle
        say "single-node cluster up: $(sinfo -h -N -o '%N %c CPUs %t')"
    fi
    echo "export SLURM_CONF=$conf"
}

stop_pid_file() {  # TERM the daemon named by a PID file, wait for it, KILL it if it lingers
    local file="$dir/$1.pid" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    stop_pid_file slurmd
    stop_pid_file slurmctld
    stop_pid_file munged # only when this script started it
    say "stopped (logs kept in $dir/log)"
}

case "${1:-}" in
install) install_packages ;;
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
