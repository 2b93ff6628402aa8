#!/bin/bash
# Bring up a real Slurm cluster on this machine: slurmctld on the host and one
# slurmd per node, each node in its own network + UTS namespace on a private
# bridge (10.77.0.0/24). Idempotent: re-running repairs whatever is missing.
# Root only. See ci/slurm/README.md.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "must run as root"
exec </dev/null

T_START=$(now)
mkdir -p "$TSCI_STATE" "$TSCI_LOG" "$TSCI_RUN"
phase() { say "phase $1 $(elapsed "$2")s"; }

# ---------------------------------------------------------------- install
POLICY=/usr/sbin/policy-rc.d
POLICY_SAVE=/usr/sbin/policy-rc.d.toksearch-ci-save
policy_restore() {
    if [[ -e $POLICY_SAVE ]]; then
        mv -f "$POLICY_SAVE" "$POLICY"
    elif [[ -e $POLICY ]] && grep -q "$TSCI_MARK" "$POLICY" 2>/dev/null; then
        rm -f "$POLICY"
    fi
}
policy_block() {
    if [[ -e $POLICY ]] && ! grep -q "$TSCI_MARK" "$POLICY"; then
        cp -p "$POLICY" "$POLICY_SAVE"
    fi
    printf '#!/bin/sh\n# %s: block service starts during apt-get install\nexit 101\n' \
        "$TSCI_MARK" >"$POLICY"
    chmod 0755 "$POLICY"
}

apt_install() {
    local aptlog=$TSCI_LOG/apt.log
    local -a opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    export DEBIAN_FRONTEND=noninteractive
    say "installing: $*  (log: $aptlog)"
    trap policy_restore EXIT
    policy_block
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q >>"$aptlog" 2>&1 || { tail_log "$aptlog"; die "apt-get update failed"; }
    fi
    if ! apt-get install "${opts[@]}" "$@" >>"$aptlog" 2>&1; then
        # stale package lists: refresh once and retry
        apt-get update -q >>"$aptlog" 2>&1 || { tail_log "$aptlog"; die "apt-get update failed"; }
        apt-get install "${opts[@]}" "$@" >>"$aptlog" 2>&1 \
            || { tail_log "$aptlog"; die "apt-get install $* failed"; }
    fi
    policy_restore
    trap - EXIT
}

t=$(now)
missing=()
for p in slurm-wlm slurmctld slurmd slurm-client munge iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if (( ${#missing[@]} )); then
    apt_install "${missing[@]}"
fi
phase install "$t"

# ---------------------------------------------------------------- network
t=$(now)
if ! ip link show dev "$TSCI_BRIDGE" >/dev/null 2>&1; then
    ip link add "$TSCI_BRIDGE" type bridge
fi
ip addr replace "$TSCI_BRIDGE_ADDR/24" dev "$TSCI_BRIDGE"
ip link set "$TSCI_BRIDGE" up

mkdir -p /run/netns
for node in $(node_names); do
    ns=$(node_ns "$node") veth=$(node_veth "$node") addr=$(node_addr "$node")
    # /run survives reboots on some machines: drop a namespace file that is no
    # longer a mount of a live namespace.
    if [[ -e /run/netns/$ns ]] && ! mountpoint -q "/run/netns/$ns"; then
        rm -f "/run/netns/$ns"
    fi
    [[ -e /run/netns/$ns ]] || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! ip -n "$ns" link show dev eth0 >/dev/null 2>&1; then
        ip link del "$veth" 2>/dev/null || true
    fi
    if ! ip link show dev "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$TSCI_BRIDGE"
    ip link set "$veth" up
    ip -n "$ns" addr replace "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    # on-link default route: address detection that "connects" to a public
    # address works; nothing answers off the bridge, so nothing leaves.
    ip -n "$ns" route replace default dev eth0
done
known_nodes >"$TSCI_STATE/nodes.new" && mv -f "$TSCI_STATE/nodes.new" "$TSCI_STATE/nodes"

# /etc/hosts: rewrite contents in place (it may be a bind mount), our lines
# carry a marker so down.sh removes exactly those.
hosts_new=$(
    grep -v "# $TSCI_MARK\$" /etc/hosts || true
    for node in $(node_names); do
        printf '%s\t%s %s-ib # %s\n' "$(node_addr "$node")" "$node" "$node" "$TSCI_MARK"
    done
)
if [[ $hosts_new != "$(cat /etc/hosts)" ]]; then
    printf '%s\n' "$hosts_new" >/etc/hosts
fi
phase network "$t"

# ---------------------------------------------------------------- munge
t=$(now)
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! pid_alive "$MUNGED_PIDFILE" munged >/dev/null; then
    if munge_ok; then
        say "munge: using the munged that is already running"
    else
        if [[ ! -s /etc/munge/munge.key ]]; then
            mkdir -p /etc/munge
            mungekey --create --keyfile=/etc/munge/munge.key
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        mkdir -p /run/munge /var/lib/munge /var/log/munge "$TSCI_STATE/munge"
        chown munge:munge /run/munge /var/lib/munge /var/log/munge "$TSCI_STATE/munge"
        chmod 0755 /run/munge "$TSCI_STATE/munge"
        runuser -u munge -- /usr/sbin/munged \
            --pid-file="$MUNGED_PIDFILE" --log-file="$TSCI_STATE/munge/munged.log" \
            </dev/null >>"$TSCI_LOG/munged.out" 2>&1 \
            || { tail_log "$TSCI_LOG/munged.out"; tail_log "$TSCI_STATE/munge/munged.log"; die "munged failed to start"; }
    fi
fi
deadline=$(( $(date +%s) + TSCI_TIMEOUT ))
until munge_ok; do
    if (( $(date +%s) >= deadline )); then
        tail_log "$TSCI_STATE/munge/munged.log"
        die "munged does not answer (munge -n | unmunge) after ${TSCI_TIMEOUT}s"
    fi
    sleep 0.05
done
phase munge "$t"

# ---------------------------------------------------------------- slurmctld
t=$(now)
CONF=$TSCI_CONF_DIR/slurm.conf
CGCONF=$TSCI_CONF_DIR/cgroup.conf

cpus=$(getconf _NPROCESSORS_ONLN)
mem_mb=${TOKSEARCH_CI_SLURM_MEM_MB:-$(awk -v n="$TSCI_NODES" \
    '/^MemTotal:/ { m = int($2 / 1024 * 3 / 4 / n); if (m < 256) m = 256; print m }' /proc/meminfo)}
# CPUs per node: distinct by default (node k has k+1: tsn1..tsn3 have 2, 3, 4), so that a
# test reading a node's CPUs on the wrong node fails; more CPUs than the machine has is
# fine with SlurmdParameters=config_overrides. TOKSEARCH_CI_SLURM_CPUS="2 2 2" (one per
# node, in order) or "same" (every node: this machine's CPUs) sets them.
read -r -a cpu_list <<<"${TOKSEARCH_CI_SLURM_CPUS:-}"
node_cpus() {  # node_cpus K (1-based)
    if [[ ${cpu_list[0]:-} == same ]]; then
        echo "$cpus"
    else
        echo "${cpu_list[$1 - 1]:-$(($1 + 1))}"
    fi
}
nodes_conf=$(
    k=0
    for node in $(node_names); do
        k=$((k + 1))
        c=$(node_cpus "$k")
        printf 'NodeName=%s NodeAddr=%s NodeHostname=%s CPUs=%s Sockets=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s State=UNKNOWN\n' \
            "$node" "$(node_addr "$node")" "$node" "$c" "$c" "$mem_mb"
    done
)
render() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == "@NODES@" ]]; then
            printf '%s\n' "$nodes_conf"
            continue
        fi
        line=${line//@CTLD_HOST@/$(hostname -s)}
        line=${line//@CTLD_ADDR@/$TSCI_BRIDGE_ADDR}
        line=${line//@STATE@/$TSCI_STATE}
        line=${line//@RUN@/$TSCI_RUN}
        line=${line//@LOG@/$TSCI_LOG}
        printf '%s\n' "$line"
    done <"$1"
}
# install_conf TEMPLATE DEST -> succeeds (0) if DEST changed
install_conf() {
    local new
    new=$(render "$1")
    if [[ -e $2 ]] && [[ $new == "$(cat "$2")" ]]; then
        return 1
    fi
    if [[ -e $2 ]] && ! grep -q "$TSCI_MARK" "$2" && [[ ! -e $2.toksearch-ci-backup ]]; then
        cp -p "$2" "$2.toksearch-ci-backup"
        say "saved the previous $2 as $2.toksearch-ci-backup"
    fi
    mkdir -p "$(dirname "$2")"
    printf '%s\n' "$new" >"$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    return 0
}
conf_changed=0
install_conf "$TSCI_DIR/slurm.conf.in" "$CONF" && conf_changed=1
install_conf "$TSCI_DIR/cgroup.conf.in" "$CGCONF" && conf_changed=1
if (( conf_changed )); then
    # daemons from an older configuration: restart them all
    specs=("slurmctld:$SLURMCTLD_PIDFILE")
    for node in $(known_nodes); do specs+=("slurmd:$(slurmd_pidfile "$node")"); done
    stop_pidfiles "${specs[@]}"
fi

mkdir -p "$TSCI_STATE/slurmctld" "$TSCI_STATE/spool"
if ! pid_alive "$SLURMCTLD_PIDFILE" slurmctld >/dev/null; then
    rm -f "$SLURMCTLD_PIDFILE"
    slurmctld -c -f "$CONF" </dev/null >>"$TSCI_LOG/slurmctld.out" 2>&1 \
        || { tail_log "$TSCI_LOG/slurmctld.out"; tail_log "$TSCI_LOG/slurmctld.log"; die "slurmctld failed to start"; }
fi
deadline=$(( $(date +%s) + TSCI_TIMEOUT ))
ctld_start=$(date +%s)
until scontrol ping >/dev/null 2>&1; do
    # the pid file appears once slurmctld has daemonized: give it 5 s
    if (( $(date +%s) - ctld_start >= 5 )) && ! pid_alive "$SLURMCTLD_PIDFILE" slurmctld >/dev/null; then
        tail_log "$TSCI_LOG/slurmctld.out"
        tail_log "$TSCI_LOG/slurmctld.log"
        die "slurmctld is not running (pid file $SLURMCTLD_PIDFILE)"
    fi
    if (( $(date +%s) >= deadline )); then
        tail_log "$TSCI_LOG/slurmctld.log"
        die "slurmctld does not answer 'scontrol ping' after ${TSCI_TIMEOUT}s"
    fi
    sleep 0.05
done
phase slurmctld "$t"

# ---------------------------------------------------------------- slurmd
t=$(now)
for node in $(node_names); do
    slurmd_alive "$node" >/dev/null && continue
    # a slurmd for this node outside its namespace (namespace was recreated)
    stop_pidfiles "slurmd:$(slurmd_pidfile "$node")"
    mkdir -p "$TSCI_STATE/spool/slurmd-$node"
    "$TSCI_DIR/in-node.sh" "$node" slurmd -N "$node" -f "$CONF" \
        </dev/null >>"$TSCI_LOG/slurmd-$node.out" 2>&1 \
        || { tail_log "$TSCI_LOG/slurmd-$node.out"; tail_log "$(slurmd_logfile "$node")"; die "slurmd for $node failed to start"; }
done
phase slurmd "$t"

# ---------------------------------------------------------------- ready
t=$(now)
deadline=$(( $(date +%s) + TSCI_TIMEOUT ))
declare -A dead_since=() resumed=()
while :; do
    problem=""
    if ! pid_alive "$SLURMCTLD_PIDFILE" slurmctld >/dev/null; then
        tail_log "$TSCI_LOG/slurmctld.log"
        die "slurmctld died (pid file $SLURMCTLD_PIDFILE)"
    fi
    # before slurmctld answers, sinfo fails: that must not end the script
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || states=""
    for node in $(node_names); do
        if ! slurmd_alive "$node" >/dev/null; then
            problem=${problem:-"slurmd for $node is not running (pid file $(slurmd_pidfile "$node"))"}
            dead_since[$node]=${dead_since[$node]:-$(date +%s)}
            if (( $(date +%s) - ${dead_since[$node]} >= 3 )); then
                tail_log "$TSCI_LOG/slurmd-$node.out"
                tail_log "$(slurmd_logfile "$node")"
                die "slurmd for $node is not running (pid file $(slurmd_pidfile "$node"))"
            fi
            continue
        fi
        unset "dead_since[$node]"
        st=$(awk -v n="$node" '$1 == n { print $2; exit }' <<<"$states")
        case $st in
            idle | mixed | allocated | completing) ;;
            *)
                problem=${problem:-"node $node is '${st:-not listed by sinfo}' in sinfo"}
                # 'down'/'drained' left over from an earlier slurmd: resume once
                if [[ $st == down || $st == drained ]] && [[ -z ${resumed[$node]:-} ]] \
                    && awk -v a="$t" -v b="$(now)" 'BEGIN { exit !(b - a > 2) }'; then
                    say "node $node is $st: scontrol update State=RESUME"
                    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                    resumed[$node]=1
                fi
                ;;
        esac
    done
    [[ -z $problem ]] && break
    if (( $(date +%s) >= deadline )); then
        echo "$states" >&2
        tail_log "$TSCI_LOG/slurmctld.log"
        for node in $(node_names); do tail_log "$(slurmd_logfile "$node")"; done
        die "cluster not ready after ${TSCI_TIMEOUT}s: $problem"
    fi
    sleep 0.1
done
phase ready "$t"
say "up: $(node_names | paste -sd ' ') idle ($(elapsed "$T_START")s total; logs in $TSCI_LOG)"
