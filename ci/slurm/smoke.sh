#!/bin/bash
# Smoke test of the cluster that ci/slurm/up.sh brought up. Exits non-zero on
# any failure. Every command is bounded in time.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec </dev/null

T=${TOKSEARCH_CI_SLURM_SMOKE_TIMEOUT:-60}   # per command
failures=0
ok() { say "smoke ok: $*"; }
bad() { echo "ci/slurm: smoke FAILED: $*" >&2; failures=$((failures + 1)); }
tmp=$(mktemp -d /tmp/tsci-smoke.XXXXXX)
server_pid=""
cleanup() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
nodes=$(node_names | paste -sd ' ')
mid=$TSCI_PREFIX$(( (TSCI_NODES + 1) / 2 ))   # tsn2 with 3 nodes

# 1. srun over all nodes
t=$(now)
got=$(timeout "$T" srun -N"$TSCI_NODES" hostname 2>"$tmp/err" | sort | paste -sd ' ') || true
if [[ $got == "$nodes" ]]; then ok "srun -N$TSCI_NODES hostname -> $got ($(elapsed "$t")s)"
else bad "srun -N$TSCI_NODES hostname printed '$got', want '$nodes'"; cat "$tmp/err" >&2; fi

# 2. salloc + an overlapping step on one chosen node
t=$(now)
got=$(timeout "$T" salloc -N "$TSCI_NODES" srun --overlap -N1 -w "$mid" hostname 2>"$tmp/err") || true
if [[ $got == "$mid" ]]; then ok "salloc -N $TSCI_NODES srun --overlap -N1 -w $mid hostname -> $got ($(elapsed "$t")s)"
else bad "salloc ... -w $mid hostname printed '$got'"; cat "$tmp/err" >&2; fi

# 3. the node's processes see the node's own address
want_addr=$(node_addr "$mid")
got=$(timeout "$T" srun -N1 -w "$mid" hostname -I 2>"$tmp/err" | xargs) || true
if [[ $got == "$want_addr" ]]; then ok "hostname -I on $mid -> $got"
else bad "hostname -I on $mid printed '$got', want '$want_addr'"; cat "$tmp/err" >&2; fi

# 4. sbatch, polled to completion with scontrol (no accounting, no --wait)
t=$(now)
cat >"$tmp/job.sh" <<'EOF'
#!/bin/bash
echo "batch on $(hostname) nodes=$SLURM_JOB_NODELIST"
srun hostname | sort
EOF
nb=$(( TSCI_NODES >= 2 ? 2 : 1 ))
jobid=$(cd "$tmp" && timeout "$T" sbatch --parsable -N"$nb" -o "$tmp/job.out" job.sh 2>"$tmp/err") || true
jobid=${jobid%%;*}
if [[ ! $jobid =~ ^[0-9]+$ ]]; then
    bad "sbatch --parsable printed '$jobid'"; cat "$tmp/err" >&2
else
    state=""
    deadline=$(( $(date +%s) + T ))
    while (( $(date +%s) < deadline )); do
        state=$(scontrol show job -o "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2) || state=""
        case $state in
            COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) break ;;
        esac
        sleep 0.1
    done
    if (( nb == 2 )); then
        want="batch on ${TSCI_PREFIX}1 nodes=${TSCI_PREFIX}[1-2] ${TSCI_PREFIX}1 ${TSCI_PREFIX}2"
    else
        want="batch on ${TSCI_PREFIX}1 nodes=${TSCI_PREFIX}1 ${TSCI_PREFIX}1"
    fi
    out=$(xargs <"$tmp/job.out" 2>/dev/null) || out=""
    if [[ $state == COMPLETED && $out == "$want" ]]; then
        ok "sbatch job $jobid COMPLETED ($(elapsed "$t")s): $out"
    else
        bad "sbatch job $jobid state '${state:-unknown}', output '$out' (want '$want')"
        scontrol cancel "$jobid" 2>/dev/null || true
    fi
fi

# 5. TCP between two node namespaces, by name and by address
if (( TSCI_NODES >= 2 )); then
    t=$(now)
    port=18765
    srv=${TSCI_PREFIX}2 cli=${TSCI_PREFIX}1
    srv_addr=$(node_addr "$srv")
    echo "hello from $srv" >"$tmp/hello.txt"
    timeout "$T" "$TSCI_DIR/in-node.sh" "$srv" \
        python3 -m http.server --bind "$srv_addr" --directory "$tmp" "$port" \
        >"$tmp/server.log" 2>&1 &
    server_pid=$!
    fetched=""
    for target in "$srv" "$srv_addr"; do
        fetched=$(timeout "$T" "$TSCI_DIR/in-node.sh" "$cli" python3 - "http://$target:$port/hello.txt" <<'EOF' 2>>"$tmp/client.err"
import sys, time, urllib.request
url, last = sys.argv[1], None
for _ in range(100):                      # bounded: at most ~10 s
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            sys.stdout.write(r.read().decode()); sys.exit(0)
    except OSError as e:
        last = e; time.sleep(0.1)
sys.exit("fetch %s failed: %s" % (url, last))
EOF
        ) || true
        if [[ $fetched == "hello from $srv" ]]; then ok "TCP $cli -> $target:$port ($(elapsed "$t")s)"
        else bad "TCP $cli -> $target:$port got '$fetched'"; cat "$tmp/client.err" "$tmp/server.log" >&2; fi
    done
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
fi

if (( failures )); then
    echo "ci/slurm: smoke: $failures check(s) FAILED" >&2
    exit 1
fi
say "smoke: all checks passed"
