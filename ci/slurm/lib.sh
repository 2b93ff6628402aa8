# Shared settings and helpers for ci/slurm/{up,down,smoke}.sh. Sourced, not run.
# shellcheck shell=bash disable=SC2034

# ---- settings (environment overrides) --------------------------------------
TSCI_NODES=${TOKSEARCH_CI_SLURM_NODES:-3}            # number of compute nodes
TSCI_PREFIX=${TOKSEARCH_CI_SLURM_PREFIX:-tsn}        # node names: tsn1 tsn2 ...
TSCI_STATE=${TOKSEARCH_CI_SLURM_STATE:-/var/run/toksearch-ci-slurm}
TSCI_TIMEOUT=${TOKSEARCH_CI_SLURM_TIMEOUT:-60}       # up.sh readiness deadline (s)
TSCI_STOP_TIMEOUT=${TOKSEARCH_CI_SLURM_STOP_TIMEOUT:-20}  # down.sh SIGTERM->SIGKILL (s)
TSCI_CONF_DIR=${TOKSEARCH_CI_SLURM_CONF_DIR:-/etc/slurm}
TSCI_NET=10.77.0                                     # /24 that only exists on our bridge
TSCI_BRIDGE=tsci-br0
TSCI_BRIDGE_ADDR=$TSCI_NET.254
TSCI_NS_PREFIX=tsci-                                 # netns name: tsci-<node>
TSCI_MARK=toksearch-ci-slurm                         # marker in /etc/hosts and slurm.conf

TSCI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TSCI_LOG=$TSCI_STATE/log
TSCI_RUN=$TSCI_STATE/run

if ! [[ $TSCI_NODES =~ ^[0-9]+$ ]] || (( TSCI_NODES < 1 || TSCI_NODES > 200 )); then
    echo "ci/slurm: TOKSEARCH_CI_SLURM_NODES must be 1..200" >&2
    exit 2
fi

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# ---- helpers ----------------------------------------------------------------
say() { echo "ci/slurm: $*"; }
die() { echo "ci/slurm: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

node_names() {
    local i
    for ((i = 1; i <= TSCI_NODES; i++)); do echo "$TSCI_PREFIX$i"; done
}
node_index() { echo "${1#"$TSCI_PREFIX"}"; }
node_addr() { echo "$TSCI_NET.$(node_index "$1")"; }
node_ns() { echo "$TSCI_NS_PREFIX$1"; }
node_veth() { echo "tsci-h$(node_index "$1")"; }   # host side; <= 15 chars

slurmd_pidfile() { echo "$TSCI_RUN/slurmd-$1.pid"; }
slurmd_logfile() { echo "$TSCI_LOG/slurmd-$1.log"; }
SLURMCTLD_PIDFILE=$TSCI_RUN/slurmctld.pid
MUNGED_PIDFILE=$TSCI_STATE/munge/munged.pid

# pid_alive PIDFILE COMM -> prints the pid and succeeds if the pid file names a
# live process whose command name is COMM (guards against stale / reused pids).
pid_alive() {
    local pidfile=$1 comm=$2 pid c
    [[ -r $pidfile ]] || return 1
    pid=$(cat -- "$pidfile" 2>/dev/null) || return 1   # may vanish meanwhile
    pid=${pid//[^0-9]/}
    [[ -n $pid ]] || return 1
    c=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $c == "$comm" ]] || return 1
    # a zombie is not alive
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

# slurmd_alive NODE -> pid of the slurmd for NODE, running in NODE's netns.
slurmd_alive() {
    local node=$1 pid ns_ino
    pid=$(pid_alive "$(slurmd_pidfile "$node")" slurmd) || return 1
    ns_ino=$(stat -L -c %i "/run/netns/$(node_ns "$node")" 2>/dev/null) || return 1
    [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "net:[$ns_ino]" ]] || return 1
    echo "$pid"
}

# stop_pidfiles COMM:PIDFILE ...: SIGTERM every live process named by the pid
# files (only if its command name is COMM), wait for all of them up to
# TSCI_STOP_TIMEOUT s, then SIGKILL the rest. Removes the pid files.
stop_pidfiles() {
    local spec comm pidfile pid deadline left
    local -a live=()
    for spec in "$@"; do
        comm=${spec%%:*} pidfile=${spec#*:}
        if pid=$(pid_alive "$pidfile" "$comm"); then
            say "stopping $comm (pid $pid, $pidfile)"
            kill -TERM "$pid" 2>/dev/null || true
            live+=("$spec")
        else
            rm -f "$pidfile"
        fi
    done
    deadline=$(( $(date +%s) + TSCI_STOP_TIMEOUT ))
    while :; do
        left=0
        for spec in "${live[@]}"; do
            comm=${spec%%:*} pidfile=${spec#*:}
            pid_alive "$pidfile" "$comm" >/dev/null && left=1
        done
        (( left )) || break
        if (( $(date +%s) >= deadline )); then
            for spec in "${live[@]}"; do
                comm=${spec%%:*} pidfile=${spec#*:}
                if pid=$(pid_alive "$pidfile" "$comm"); then
                    say "$comm (pid $pid) still alive after ${TSCI_STOP_TIMEOUT}s: SIGKILL"
                    kill -KILL "$pid" 2>/dev/null || true
                fi
            done
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    for spec in "${live[@]}"; do rm -f "${spec#*:}"; done
}

# Nodes that some up.sh created (recorded), plus the current setting.
known_nodes() {
    { node_names; cat "$TSCI_STATE/nodes" 2>/dev/null || true; } | awk 'NF && !seen[$0]++'
}

tail_log() {
    local f=$1
    if [[ -s $f ]]; then
        echo "---- last lines of $f ----" >&2
        tail -n 25 "$f" >&2
        echo "----" >&2
    else
        echo "(log $f is empty or missing)" >&2
    fi
}
