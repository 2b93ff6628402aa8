#!/bin/bash
# Run a command "on" a test-cluster node: in the node's network namespace and in
# a fresh UTS namespace whose hostname is the node name.
#   ci/slurm/in-node.sh tsn2 hostname -I
# Uses nsenter --net (not `ip netns exec`, which remounts /sys: slurmd then fails
# with "No filesystem mounted on /sys/fs/cgroup").
set -euo pipefail
if (( $# < 2 )); then
    echo "usage: $0 NODE COMMAND [ARG...]" >&2
    exit 2
fi
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
node=$1
shift
ns=/run/netns/$(node_ns "$node")
[[ -e $ns ]] || die "no network namespace $ns (is the cluster up?)"
# shellcheck disable=SC2016  # $0/$@ belong to the inner sh
exec nsenter --net="$ns" -- unshare --uts -- \
    /bin/sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
