#!/bin/bash
# Tear down what ci/slurm/up.sh built: stop its daemons by pid file, kill what
# is left inside the node namespaces, remove namespaces, veths, bridge, the
# /etc/hosts lines it added, and restore the previous slurm.conf/cgroup.conf.
# Safe to run when nothing is up.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "must run as root"
exec </dev/null
T_START=$(now)

# ---- daemons, by pid file (slurmds and slurmctld together, then munged)
specs=("slurmctld:$SLURMCTLD_PIDFILE")
for node in $(known_nodes); do specs+=("slurmd:$(slurmd_pidfile "$node")"); done
stop_pidfiles "${specs[@]}"
stop_pidfiles "munged:$MUNGED_PIDFILE"

# ---- whatever still runs inside our namespaces (job leftovers), by pid
namespaces=$(
    { for node in $(known_nodes); do node_ns "$node"; done
      ip netns list 2>/dev/null | awk '{print $1}' | grep "^$TSCI_NS_PREFIX" || true
    } | awk 'NF && !seen[$0]++'
)
ns_pids() {
    local ns
    for ns in $namespaces; do
        if [[ -e /run/netns/$ns ]]; then ip netns pids "$ns" 2>/dev/null || true; fi
    done
}
left=$(ns_pids)
if [[ -n $left ]]; then
    say "killing processes left in the node namespaces: $(xargs <<<"$left")"
    # shellcheck disable=SC2086
    kill -TERM $left 2>/dev/null || true
    deadline=$(( $(date +%s) + 5 ))
    while [[ -n $(ns_pids) ]] && (( $(date +%s) < deadline )); do sleep 0.1; done
    left=$(ns_pids)
    # shellcheck disable=SC2086
    [[ -z $left ]] || kill -KILL $left 2>/dev/null || true
    sleep 0.1
fi

# ---- the per-node cgroups slurmd made (proctrack/cgroup), now empty
for node in $(known_nodes); do
    for cg in /sys/fs/cgroup/*/"slurm_$node"; do
        [[ -d $cg ]] || continue
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
done

# ---- network
for ns in $namespaces; do
    if [[ -e /run/netns/$ns ]]; then
        ip netns del "$ns" 2>/dev/null || rm -f "/run/netns/$ns"
    fi
done
for node in $(known_nodes); do
    veth=$(node_veth "$node")
    ! ip link show dev "$veth" >/dev/null 2>&1 || ip link del "$veth"
done
! ip link show dev "$TSCI_BRIDGE" >/dev/null 2>&1 || ip link del "$TSCI_BRIDGE"

# ---- /etc/hosts (rewrite in place: it may be a bind mount)
if grep -q "# $TSCI_MARK\$" /etc/hosts 2>/dev/null; then
    hosts_new=$(grep -v "# $TSCI_MARK\$" /etc/hosts || true)
    printf '%s\n' "$hosts_new" >/etc/hosts
fi

# ---- configuration files
for f in "$TSCI_CONF_DIR/slurm.conf" "$TSCI_CONF_DIR/cgroup.conf"; do
    if [[ -e $f.toksearch-ci-backup ]]; then
        mv -f "$f.toksearch-ci-backup" "$f"
        say "restored $f"
    elif [[ -e $f ]] && grep -q "$TSCI_MARK" "$f"; then
        rm -f "$f"
    fi
done

# ---- state (logs are kept for post-mortems; up.sh appends to them)
rm -rf "$TSCI_RUN" "$TSCI_STATE/slurmctld" "$TSCI_STATE/spool" "$TSCI_STATE/nodes"
if [[ -d $TSCI_STATE/munge ]]; then
    find "$TSCI_STATE/munge" -mindepth 1 ! -name munged.log -delete 2>/dev/null || true
fi
say "down ($(elapsed "$T_START")s)"
