#!/usr/bin/env bash
# Set up everything toksearch_launch needs on a fresh Debian 12 machine, idempotently:
# Debian packages (python3-venv, a Java runtime for Spark), the virtual environment
# .venv and the package with Ray, PySpark and the test tools. Re-running is fast.
# --tests (or TOKSEARCH_TEST_DEPS=1) also installs what only the tests need: PostgreSQL
# (Debian's postgresql; the SQL tests start a private server of their own, see tests/pg_server.py).
set -euo pipefail
cd "$(dirname "$0")/.."
test_deps=${TOKSEARCH_TEST_DEPS:-0}
for arg in "$@"; do
    case "$arg" in
        --tests) test_deps=1 ;;
        *) echo "bootstrap: unknown option $arg (known: --tests)" >&2; exit 2 ;;
    esac
done
t0=$(date +%s.%N)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ "$test_deps" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bootstrap: apt-get install ${need_apt[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.toksearch-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: pip install -e .[all,test] (first run: about a minute)"
    log=.venv/pip-install.log
    if ! { .venv/bin/python -m pip install --upgrade pip "setuptools>=77" wheel \
           && .venv/bin/python -m pip install -e ".[all,test]"; } >"$log" 2>&1; then
        tail -n 30 "$log"
        echo "bootstrap: pip install failed (full log: $log)" >&2
        exit 1
    fi
    .venv/bin/python -c "import toksearch_launch, hydra, ray, pyspark, mdsthin"
    echo "$want" > "$stamp"
fi
# bytecode for the package, as a regular (non-editable) pip install writes it: without it every
# toksearch_submit compiles its modules again (~0.2 s), where PYTHONDONTWRITEBYTECODE is set
.venv/bin/python -m compileall -q toksearch_launch >/dev/null || true
python3 -c "import sys, time; print(f\"bootstrap: ready in {time.time() - float(sys.argv[1]):.1f}s (.venv/bin/toksearch_submit)\")" "$t0"
