#!/usr/bin/env bash
# The whole test suite: set up, bring up the 3-node SLURM test cluster (ci/slurm),
# run unit, cluster and slurm tests, and bring the cluster down even when tests fail.
# Unit tests alone, no SLURM needed:  .venv/bin/python -m pytest -m "not slurm and not cluster"
set -euo pipefail
cd "$(dirname "$0")/.."
now() { date +%s.%N; }
phase() { printf 'test.sh: phase %-10s %6.1fs\n' "$1" "$(python3 -c "print($(now) - $2)")"; }

t=$(now); bash scripts/bootstrap.sh --tests; phase bootstrap "$t"
if [ "$(id -u)" = 0 ]; then
    t=$(now)
    trap 'bash ci/slurm/down.sh >/dev/null 2>&1 || true' EXIT
    bash ci/slurm/up.sh
    phase slurm-up "$t"
    marker=()
else
    echo "test.sh: not root: cannot start the SLURM test cluster; running the tests that need no SLURM"
    marker=(-m "not slurm")
fi
t=$(now)
rc=0
TOKSEARCH_REQUIRE_SQL=1 TOKSEARCH_REQUIRE_SLURM=$([ "$(id -u)" = 0 ] && echo 1 || echo 0) \
    .venv/bin/python -m pytest -ra --durations=25 "${marker[@]}" "$@" || rc=$?
phase pytest "$t"
exit "$rc"
