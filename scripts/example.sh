#!/usr/bin/env bash
# The main job for a newcomer: set up, then run TokSearch's example on this machine
# (site=local: a 2-node Ray cluster of local processes, no SLURM, no MDSplus server).
# Extra arguments replace the backend: scripts/example.sh spark
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
backend="${1:-ray}"
exec .venv/bin/toksearch_submit site=local nodes=2 \
    .venv/bin/python examples/toksearch_example.py --source synthetic -- "$backend"
