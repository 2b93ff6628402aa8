"""`backend.start=background`: the cluster starts while COMMAND runs; compute_*() waits for what remains.

Real Ray / Spark / Dask daemons on site=local (2 nodes), the real in-job wrapper,
and one run of the example on the 3-node SLURM cluster.  "Nothing left" is
checked as the other cluster tests do: no process carries the wrapper's owner
marker or the cluster's temp-dir marker, and the temp dirs are gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from test_cluster_local import owned_by
from toksearch_launch.cluster import default_local_config, procs

PY = sys.executable
EXAMPLE = [PY, str(ROOT / "examples" / "toksearch_example.py")]
WRAPPER = [PY, "-m", "toksearch_launch.cluster.eager", "--start", "background"]


# ------------------------------------------------------------------ helpers


def roots_in(run_dir: Path, backend: str) -> set[str]:
    """The cluster temp dirs the start used, from the commands it logged."""
    log = run_dir / "logs" / f"{backend}-cluster.log"
    return set(re.findall(r"(/tmp/tsl-[0-9a-f]{6})/", log.read_text())) if log.exists() else set()


def assert_nothing_left(run_dir: Path, backend: str, owner_pid: int) -> None:
    roots = roots_in(run_dir, backend)
    assert owned_by(owner_pid) == []
    assert procs.members(set(), roots) == []
    assert not any(Path(r).exists() for r in roots), roots


def status_of(run_dir: Path, backend: str) -> dict:
    [path] = run_dir.glob(f"cluster-{backend}-*.start.json")
    return json.loads(path.read_text())


def job_env(tmp_path: Path, **over) -> dict:
    cfg = tmp_path / "toksearch.yaml"
    OmegaConf.save(default_local_config(nodes=2, **over), cfg)
    return dict(os.environ, TOKSEARCH_CONFIG=str(cfg), TOKSEARCH_RUN_DIR=str(tmp_path))


def serial_values(tmp_path: Path, count: int) -> list:
    out = tmp_path / "serial.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
    subprocess.run([*EXAMPLE, "--source", "synthetic", "--count", str(count), "--output", str(out), "serial"],
                   check=True, capture_output=True, cwd=tmp_path, env=env, timeout=300)
    return json.loads(out.read_text())


# ------------------------------------------------------------------ the example


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark", "dask"])
def test_example_under_background_start_equals_serial(tmp_path, backend):
    out = tmp_path / "records.json"
    result = run_cli(["site=local", "nodes=2", f"backend={backend}", "backend.start=background", *EXAMPLE,
                      "--source", "synthetic", "--count", "2000", "--output", str(out), "--", backend],
                     tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Got 2000 results using {backend}" in result.stdout
    assert "Cluster nodes: 127.0.0.2,127.0.0.3" in result.stdout
    assert json.loads(out.read_text()) == serial_values(tmp_path, 2000)  # value by value, in order
    [log] = list(tmp_path.rglob(f"logs/{backend}-cluster.log"))
    run_dir = log.parent.parent
    assert status_of(run_dir, backend)["state"] == "ready"
    assert "nothing left" in log.read_text()
    roots = roots_in(run_dir, backend)
    assert roots and procs.members(set(), roots) == []
    assert not any(Path(r).exists() for r in roots)


# ------------------------------------------------------------------ never used

#: COMMAND that never calls compute_*: exits at once, or once the cluster is ready.
UNUSED = r"""
import json, os, sys, time
backend, when, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ADDRESS-ENV", [k for k in ("RAY_ADDRESS", "SPARK_MASTER_URL", "DASK_SCHEDULER_ADDRESS") if k in os.environ])
status = os.environ["TOKSEARCH_CLUSTER_" + backend.upper() + "_START"]
deadline = time.monotonic() + 240
while when == "after-ready" and json.load(open(status))["state"] != "ready":
    assert time.monotonic() < deadline, open(status).read()
    time.sleep(0.1)
print("STATE", json.load(open(status))["state"], flush=True)
sys.exit(code)
"""


@pytest.mark.cluster
@pytest.mark.parametrize("backend,when", [("ray", "after-ready"), ("spark", "during-start")])  # each value once
def test_a_script_that_never_computes_keeps_its_exit_code_and_leaves_nothing(tmp_path, backend, when):
    proc = subprocess.run([*WRAPPER, "--backend", backend, "--", PY, "-c", UNUSED, backend, when, "7"],
                          cwd=ROOT, env=job_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "ADDRESS-ENV []" in proc.stdout  # nothing exported: the address is not known yet
    if when == "after-ready":
        assert "STATE ready" in proc.stdout
        assert "nothing left" in (tmp_path / "logs" / f"{backend}-cluster.log").read_text()
    assert "did not start" not in proc.stderr  # a start stopped because COMMAND ended is no failure
    assert_nothing_left(tmp_path, backend, proc_pid_from(tmp_path, backend))


def proc_pid_from(run_dir: Path, backend: str) -> int:
    """The wrapper's PID (the cluster's owner), from its status file's name."""
    [path] = run_dir.glob(f"cluster-{backend}-*.start.json")
    return int(path.name.split("-")[2].split(".")[0])


SLEEPER = r"""
import os, time
print("PID", os.getpid(), flush=True)
time.sleep(600)
"""


@pytest.mark.cluster
def test_command_sigkilled_during_the_start_leaves_nothing(tmp_path):
    env = job_env(tmp_path)
    wrapper = subprocess.Popen([*WRAPPER, "--backend", "ray", "--", PY, "-c", SLEEPER], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = wrapper.stdout.readline()
        assert line.startswith("PID "), line
        # kill COMMAND while its cluster is still starting (the head's wrapper already runs)
        deadline = time.monotonic() + 120
        while not owned_by(wrapper.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_of(tmp_path, "ray")["state"] == "starting"
        os.kill(int(line.split()[1]), signal.SIGKILL)
        rc = wrapper.wait(timeout=60)
        rest = wrapper.stdout.read()
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert rc == 128 + signal.SIGKILL, rest
    assert_nothing_left(tmp_path, "ray", wrapper.pid)


# ------------------------------------------------------------------ a start that fails

COMPUTE = r"""
import json, sys
from toksearch_launch import Pipeline
from toksearch_launch.cluster import ClusterError
backend = sys.argv[1]
pipe = Pipeline([1, 2, 3])
@pipe.map
def double(rec):
    rec["x"] = rec["shot"] * 2
try:
    getattr(pipe, "compute_" + backend)()
except ClusterError as exc:
    print("ERROR " + json.dumps([type(exc).__name__, str(exc)]), flush=True)
    sys.exit(5)
print("NO ERROR", flush=True)
"""

BAD_OPTION = {"ray": {"ray": {"worker": {"start": ["--bogus-flag"]}}},
              "spark": {"spark": {"worker": {"start": ["--bogus-flag"]}}}}


def normalized(message: str) -> str:
    """A start error without what differs between two starts: timings, temp dirs, ports, run dirs."""
    text = re.sub(r"\d+\.\d+ s", "N s", message)
    text = re.sub(r"/tmp/tsl-[0-9a-f]{6}/\w+", "/tmp/tsl-X/DIR", text)
    text = re.sub(r"local\d+", "localK", text)  # Spark: either worker may be the first to exit
    text = re.sub(r"127\.0\.0\.\d+", "IP", text)
    text = re.sub(r"/\S*/(lazy|background)/", "/RUN/", text)
    return re.sub(r"\d{4,5}", "P", text)


def error_of(stdout: str) -> list:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("ERROR ")), None)
    assert line, stdout
    return json.loads(line[6:])


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_a_failed_start_is_the_lazy_error_from_compute_and_leaves_nothing(tmp_path, backend):
    results = {}
    for mode in ("lazy", "background"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        env = job_env(run_dir, **BAD_OPTION[backend])
        argv = [PY, "-c", COMPUTE, backend]
        if mode == "background":
            argv = [*WRAPPER, "--backend", backend, "--", *argv]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 5, proc.stdout + proc.stderr  # the script's own exit code
        results[mode] = error_of(proc.stdout)
        if mode == "background":
            assert proc.stderr.count("did not start") == 0  # compute_* said it: the wrapper adds no line
            assert_nothing_left(run_dir, backend, proc_pid_from(run_dir, backend))
            assert status_of(run_dir, backend)["seen"] is True
    kind, message = results["background"]
    assert kind == "StartError"
    first = message.splitlines()[0]
    assert re.match(rf"{backend}-worker on node local\d exited with code \d+", first), message
    assert "--bogus-flag" in message and f"logs/{backend}-worker-local" in message
    assert results["lazy"][0] == kind
    assert normalized(results["lazy"][1]).splitlines()[:3] == normalized(message).splitlines()[:3]


@pytest.mark.cluster
def test_a_failed_start_nobody_asked_for_is_one_line_and_keeps_the_exit_code(tmp_path):
    # COMMAND waits until the start has failed, without asking for the cluster, then exits 4
    script = UNUSED.replace('when == "after-ready" and json.load(open(status))["state"] != "ready"',
                            'json.load(open(status))["state"] == "starting"')
    proc = subprocess.run([*WRAPPER, "--backend", "ray", "--", PY, "-c", script, "ray", "x", "4"], cwd=ROOT,
                          env=job_env(tmp_path, **BAD_OPTION["ray"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "STATE failed" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("toksearch:")]
    assert len(lines) == 1 and "did not start (COMMAND never asked for it): ray-worker on node local2" in lines[0], \
        proc.stderr
    assert_nothing_left(tmp_path, "ray", proc_pid_from(tmp_path, "ray"))


# ------------------------------------------------------------------ SLURM


@pytest.mark.slurm
def test_slurm_example_with_background_start_leaves_nothing(tmp_path):
    from slurm_support import TEST_SITE, wait_for

    out = tmp_path / "records.json"
    result = run_cli([*TEST_SITE, "nodes=3", "backend.start=background", *EXAMPLE, "--source", "synthetic",
                      "--count", "3000", "--output", str(out), "--", "ray"], tmp_path, timeout=500)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Got 3000 results using ray" in result.stdout
    nodes = re.search(r"^Cluster nodes: (\S+)$", result.stdout, re.M).group(1)
    assert sorted(nodes.split(",")) == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert json.loads(out.read_text()) == serial_values(tmp_path, 3000)
    [log] = list(tmp_path.rglob("logs/ray-cluster.log"))
    assert status_of(log.parent.parent, "ray")["state"] == "ready"
    assert "nothing left" in log.read_text()
    run_dir = log.parent.parent
    roots = roots_in(run_dir, "ray")
    assert roots
    try:  # other sessions' jobs share the nodes: look for this job's processes only
        wait_for(lambda: not ours_on_the_nodes(roots, str(run_dir)), 15, what="this job's processes to end")
    except AssertionError:
        raise AssertionError(f"left on the nodes: {ours_on_the_nodes(roots, str(run_dir))}") from None


def ours_on_the_nodes(roots: set[str], run_dir: str) -> list[str]:
    """Processes on any test node that carry one of ``roots`` (cmdline or the temp-dir marker in
    their environment) or name ``run_dir``: what this job started."""
    from slurm_support import job_processes

    left = []
    for node, entries in job_processes().items():
        for entry in entries:
            try:
                env = Path(f"/proc/{entry.split()[0]}/environ").read_bytes().decode(errors="replace")
            except OSError:
                env = ""
            if run_dir in entry or any(r in entry or r in env for r in roots):
                left.append(f"{node}: {entry[:200]}")
    return left


# ------------------------------------------------------------------ unit: plan, config, the waiter


def test_the_launcher_wraps_command_for_a_background_start():
    from types import SimpleNamespace

    from conftest import compose
    from toksearch_launch.plan import job_command

    cfg = compose(["site=local", "backend=spark", "backend.start=background"])
    assert job_command(cfg, ["python", "x.py"], SimpleNamespace(python="/venv/bin/python")) == [
        "/venv/bin/python", "-m", "toksearch_launch.cluster.eager", "--backend", "spark", "--start", "background",
        "--", "python", "x.py"]


def test_config_accepts_background_and_names_the_choices():
    from conftest import compose
    from toksearch_launch.config import ConfigError, validate

    validate(compose(["backend.start=background"]))
    with pytest.raises(ConfigError, match="backend.start='later' is not one of: lazy, eager, background"):
        validate(compose(["backend.start=later"]))


def test_the_waiter_returns_the_attach_file_raises_the_start_error_or_sees_the_starter_gone(tmp_path):
    from toksearch_launch.cluster import ClusterError, StartError
    from toksearch_launch.cluster.background import await_cluster, read_status, write_status
    from toksearch_launch.cluster.owner import this_owner

    path = tmp_path / "s.json"
    write_status(path, state="ready", info="/run/cluster-ray-1.json")
    assert await_cluster("ray", path) == "/run/cluster-ray-1.json"
    write_status(path, state="failed", kind="start", error="ray-worker on node local2 exited with code 2\n  log: x")
    with pytest.raises(StartError, match="^ray-worker on node local2 exited with code 2\n  log: x$"):
        await_cluster("ray", path)
    assert read_status(path)["seen"] is True
    gone = subprocess.run([PY, "-c", "from toksearch_launch.cluster.owner import this_owner; print(this_owner())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    write_status(path, state="starting", owner=gone, until=time.time() + 600)
    with pytest.raises(ClusterError, match=r"^the process starting the ray cluster in the background \(PID \d+\) is gone"):
        await_cluster("ray", path)
    write_status(path, state="starting", owner=this_owner(), until=time.time() - 1)
    with pytest.raises(ClusterError, match="gave no outcome in time"):
        await_cluster("ray", path)
