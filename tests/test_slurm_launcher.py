"""The launcher on the real 3-node SLURM test cluster (ci/slurm): allocation, batch, multirun, exit codes;
and the in-job step launcher: every role (the head; all workers) is one srun step (unit tests of its
pure functions first, then the count of srun clients and steps on the real cluster)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from slurm_support import TEST_SITE, job_field, job_id_from
from toksearch_launch.cluster import launcher, node as nodemod, plan as planmod, procs
from toksearch_launch.cluster.site import default_local_config
from toksearch_launch.config import as_typed

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
WRAPPER = [PY, "-m", "toksearch_launch.cluster.node"]
slurm = pytest.mark.slurm

PROBE = [sys.executable, "-c",
         "import os, socket; print('PROBE', socket.gethostname(), os.environ['SLURM_JOB_NODELIST'], "
         "os.environ.get('SLURM_JOB_NUM_NODES'), os.environ['TOKSEARCH_CONFIG'])"]


@slurm
def test_interactive_runs_on_first_node_of_allocation(tmp_path):
    result = run_cli([*TEST_SITE, "nodes=3", *PROBE], tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("PROBE"))
    _, host, nodelist, num_nodes, config = line.split()
    assert (host, nodelist, num_nodes) == ("tsn1", "tsn[1-3]", "3")
    assert Path(config).is_file() and Path(config).parent.parent.parent.name == "toksearch_runs"
    assert "stdin is not a terminal: running the step without --pty" in result.stderr


@slurm
@pytest.mark.parametrize("mode", [[], ["-b", "--wait"]], ids=["interactive", "batch-wait"])
def test_exit_code_of_the_job_comes_back(tmp_path, mode):
    result = run_cli([*TEST_SITE, *mode, "nodes=2", sys.executable, "-c", "import sys; sys.exit(7)"], tmp_path)
    assert result.returncode == 7, result.stdout + result.stderr


@slurm
def test_batch_runs_the_written_script(tmp_path):
    result = run_cli([*TEST_SITE, "-b", "--wait", "nodes=3", *PROBE, "arg with space"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_from(result.stdout)
    [script] = list(tmp_path.rglob("job.sbatch"))
    ran = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == script.read_text()
    assert job_field(job_id, "Command") == str(script)
    out = (script.parent / f"slurm-{job_id}.out").read_text()
    assert "PROBE tsn1 tsn[1-3] 3" in out


@slurm
def test_multirun_batch_one_job_per_node_count(tmp_path):
    result = run_cli([*TEST_SITE, "-m", "-b", "--wait", "nodes=1,2,3", "bash", "-c", "echo NNODES=$SLURM_NNODES"],
                     tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outs = sorted(tmp_path.rglob("slurm-*.out"), key=lambda p: p.parent.name)
    assert [p.parent.name for p in outs] == ["0", "1", "2"]
    assert [p.read_text().strip() for p in outs] == ["NNODES=1", "NNODES=2", "NNODES=3"]
    table = [ln.split() for ln in result.stdout.splitlines() if "COMPLETED" in ln and "nodes=" in ln]
    assert len(table) == 3 and {row[0] for row in table} == {job_id_from(ln) for ln in result.stdout.splitlines() if "submitted job" in ln}


@slurm
def test_default_site_no_overrides_plain_command(tmp_path):
    """Issue 6: site=default, nothing overridden, on stock Slurm 22.05 with no GPU and no X."""
    result = run_cli(["-N", "3", *PROBE], tmp_path, env={"DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    assert "PROBE tsn1 tsn[1-3] 3" in result.stdout
    assert "dropped --x11=all" in result.stderr and "drops --exclusive" in result.stderr
    result = run_cli(["-N", "3", "-b", "--wait", *PROBE], tmp_path, env={"DISPLAY": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED, exit code 0" in result.stdout


@slurm
def test_sbatch_refusal_is_one_line_exit_1(tmp_path):
    result = run_cli([*TEST_SITE, "-b", "batch.sbatch=[--no-such-sbatch-option]", "hostname"], tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("toksearch_submit: error: sbatch refused the job:") and "no-such-sbatch-option" in last


# ------------------------------------------------------------------ one step per role: pure parts (unit)


def test_step_argv_one_task_per_node_role_options_last():
    spec = "/run/steps/tsl-ab12cd-ray-worker.json"
    assert launcher.step_argv(["saga2", "saga3", "saga10"], ["--gres=gpu:volta:1", "--overlap"], spec) == [
        "srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--nodelist=saga[2-3,10]", "--export=ALL",
        "--kill-on-bad-exit=0", "--wait=0", "--label", "--gres=gpu:volta:1", "--overlap",
        *WRAPPER, "--spec", spec]
    assert launcher.step_argv(["tsn1"], [], "s.json")[:5] == ["srun", "--nodes=1", "--ntasks=1",
                                                              "--ntasks-per-node=1", "--nodelist=tsn1"]


def test_one_step_for_1000_workers_stays_one_short_command():
    argv = launcher.step_argv([f"n{k}" for k in range(2, 1001)], [], "s.json")
    assert argv[1:5] == ["--nodes=999", "--ntasks=999", "--ntasks-per-node=1", "--nodelist=n[2-1000]"]
    assert len(" ".join(argv)) < 300


def test_split_env_keeps_what_nodes_share_in_the_step_env():
    envs = {"n1": {"SECRET": "s", "MARK": "/t/r1", "A": "1"}, "n2": {"SECRET": "s", "MARK": "/t/r2", "A": "1"}}
    common, extra = launcher.split_env(envs)
    assert common == {"SECRET": "s", "A": "1"}  # the secret stays in the environment, as before
    assert extra == {"n1": {"MARK": "/t/r1"}, "n2": {"MARK": "/t/r2"}}
    assert launcher.split_env({}) == ({}, {})


def test_srun_task_lines_give_each_nodes_exit():
    text = ("0: something a task printed\n"
            "srun: error: tsn2: task 0: Exited with exit code 3\n"
            "srun: error: tsn3: task 1: Killed\n"
            "srun: error: n7: tasks 4-5: Terminated\n"
            "srun: Warning: can't run 1 processes on 2 nodes, setting nnodes to 1\n")
    assert launcher.srun_task_exits(text) == {"tsn2": 3, "tsn3": 137, "n7": 143}


def test_wrapper_lines_parse_per_node():
    assert launcher.parse_wrapper_line("toksearch-node: host=tsn2 address=10.77.0.2 step=16.3 pid=9") == \
        {"host": "tsn2", "address": "10.77.0.2", "step": "16.3", "pid": "9"}
    assert launcher.parse_wrapper_line("toksearch-node: exit=75 host=tsn3") == {"exit": "75", "host": "tsn3"}
    assert launcher.parse_wrapper_line("toksearch-node: stopped on tsn2; nothing left") is None
    assert launcher.parse_wrapper_line("2026-12-01 INFO host=x") is None


def _saga_plan(backend, tmp_path, monkeypatch, hosts):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(f"10.1.0.{k} {h}-ib\n" for k, h in enumerate(hosts, 1)))
    tree = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "site" / "saga.yaml"),
                           {"nodes": len(hosts), "site": {"address": {"hosts_file": str(hosts_file)}}})
    monkeypatch.setattr(planmod, "job_secret", lambda kind, make=None: "S3CRET-" + kind)
    monkeypatch.setenv("SLURMD_NODENAME", hosts[0])
    return planmod.make_plan(backend, as_typed(tree), hosts, tmp_path)


@pytest.mark.parametrize("backend,workers", [("ray", "n[2-3]"), ("spark", "n[1-3]"), ("dask", "n[1-3]")])
def test_each_role_is_one_step_and_every_node_has_its_own_entry(tmp_path, monkeypatch, backend, workers):
    """Golden: head = one 1-node step, workers = one step over the worker nodes, with the role's
    configured srun options; every worker daemon shares that step; its node's argv is the wrapper's."""
    plan = _saga_plan(backend, tmp_path, monkeypatch, ["n1", "n2", "n3"])
    try:
        ds = launcher.daemons_of(plan)
        head_step, worker_step = ds[0].step, ds[-1].step
        opts = plan.cfg[backend]
        assert head_step.argv == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--nodelist=n1",
                                  "--export=ALL", "--kill-on-bad-exit=0", "--wait=0", "--label",
                                  *opts.master.srun, *WRAPPER, "--spec", str(head_step.spec_path)]
        k = 2 if backend == "ray" else 3
        assert worker_step.argv == ["srun", f"--nodes={k}", f"--ntasks={k}", "--ntasks-per-node=1",
                                    f"--nodelist={workers}", "--export=ALL", "--kill-on-bad-exit=0", "--wait=0",
                                    "--label", *opts.worker.srun, *WRAPPER, "--spec", str(worker_step.spec_path)]
        assert {id(d.step) for d in ds[1:]} == {id(worker_step)} and worker_step.hosts == [d.host for d in ds[1:]]
        assert worker_step.spec_path == tmp_path / "steps" / f"{Path(plan.root).name}-{backend}-worker.json"
        assert worker_step.log_path == tmp_path / "logs" / f"{backend}-worker-step.log"
        for d in ds:  # what runs on each node: the wrapper's options, then the daemon
            assert d.argv[:3] == WRAPPER and d.argv[3:7] == ["--root", plan.root, "--dir", d.node_dir]
            assert "--check-ports" in d.argv and d.argv.index("--") > d.argv.index("--check-ports")
        assert launcher.commands_of(plan) == [head_step.argv, ds[0].argv, worker_step.argv,
                                              *[d.argv for d in ds[1:]]]
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_spawn_writes_a_private_spec_with_each_nodes_argv_env_and_log(tmp_path, monkeypatch):
    """spawn() of a role: the spec (0600 in a 0700 dir) holds each node's argv, the env only that
    node has, and its log; the shared env (the secret) goes to the one srun, started once."""
    plan = _saga_plan("spark", tmp_path, monkeypatch, ["n1", "n2"])
    started = []

    class FakeProc:
        pid = 4242

        def poll(self):
            return None

    def fake_popen(argv, **kw):
        started.append((argv, kw["env"]))
        return FakeProc()

    monkeypatch.setattr(launcher.subprocess, "Popen", fake_popen)
    try:
        srun = launcher.SrunLauncher(plan)
        _, worker_role = plan.engine.roles(plan)
        ds = srun.spawn(worker_role, {"PATH": "/bin"})
        [(argv, env)] = started  # ONE srun for both workers
        step = ds[0].step
        assert argv == step.argv and all(d.proc is ds[0].proc for d in ds)
        assert env["_SPARK_AUTH_SECRET"] == "S3CRET-spark" and env["PATH"] == "/bin" and "TOKSEARCH_CLUSTER_OWNER" in env
        assert stat.S_IMODE(step.spec_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(step.spec_path.parent.stat().st_mode) == 0o700
        spec = json.loads(step.spec_path.read_text())
        assert spec["role"] == "spark-worker" and sorted(spec["nodes"]) == ["n1", "n2"]
        for d in ds:
            entry = spec["nodes"][d.host]
            assert entry["argv"] == d.argv[3:] and entry["log"] == str(d.log_path)
            assert entry["env"]["SPARK_LOCAL_IP"] == d.address and "_SPARK_AUTH_SECRET" not in entry["env"]
            assert d.log_path.read_text().startswith("==== toksearch ")  # the header, before the node writes
        assert "S3CRET" not in step.spec_path.read_text()
        # a node's exit: its wrapper's last line, else srun's word on its task, else still running
        assert srun.exit_code(ds[0]) is None
        with open(ds[1].log_path, "a") as fh:
            fh.write("toksearch-node: ERROR on n2: no\ntoksearch-node: exit=1 host=n2\n")
        with open(step.log_path, "a") as fh:
            fh.write("srun: error: n1: task 0: Killed\n")
        assert (srun.exit_code(ds[0]), srun.exit_code(ds[1])) == (137, 1)
        assert "srun: error: n1: task 0: Killed" in ds[0].failure("exited") and str(step.log_path) in ds[0].failure("x")
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_the_wrapper_runs_its_nodes_entry_into_its_nodes_log(tmp_path):
    """The real step wrapper with ``--spec``: it picks its node's entry, appends to that node's log,
    adds that node's env, runs its argv, and ends with ``exit=N``; a node not in the spec: exit 2."""
    logs = {h: tmp_path / f"w-{h}.log" for h in ("nodeA", "nodeB")}
    code = "import os, sys; print('RAN', os.environ['ONLY_HERE'], *sys.argv[1:]); sys.exit(3)"
    spec = {"role": "x-worker", "nodes": {
        h: {"argv": ["--root", str(tmp_path / f"tsl-{h}"), "--dir", str(tmp_path / f"tsl-{h}" / "w"), "--ip",
                     "127.0.0.9", "--", PY, "-c", code, h], "env": {"ONLY_HERE": f"env-{h}"}, "log": str(logs[h])}
        for h in logs}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    for h in logs:
        out = subprocess.run([*WRAPPER, "--spec", str(path), "--node", h], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 3 and out.stdout == "", out.stdout + out.stderr
        text = logs[h].read_text()
        assert f"RAN env-{h} {h}" in text and "address=127.0.0.9" in text
        assert text.rstrip().endswith(f"toksearch-node: exit=3 host={h}")
    out = subprocess.run([*WRAPPER, "--spec", str(path), "--node", "nodeC"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "node nodeC has no entry" in out.stdout and "nodeA, nodeB" in out.stdout
    assert nodemod.node_entry(spec, "nodeA.cluster.org") == spec["nodes"]["nodeA"]


# ------------------------------------------------------------------ one step per role: the real cluster


STEPS_JOB = r"""
import json, os, subprocess, sys
import psutil
from toksearch_launch.cluster import Cluster, procs

me = psutil.Process()

def srun_clients():
    # srun processes started (directly or not) by this script; srun forks a helper
    # child per client in some versions: a client is an srun whose parent is not srun
    out = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "srun" and me.pid in [a.pid for a in p.parents()] and p.parent().name() != "srun":
                out.append(p.pid)
        except psutil.Error:
            pass
    return out

def steps():
    text = subprocess.run(["squeue", "-s", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i %N"],
                          capture_output=True, text=True, check=True).stdout
    return [line.split() for line in text.splitlines() if line.strip()]

out = {"script_step": os.environ["SLURM_JOB_ID"] + "." + os.environ["SLURM_STEP_ID"]}
for backend in sys.argv[1].split(","):
    with Cluster(backend) as c:
        out[backend] = {"srun_clients": srun_clients(), "steps": steps(),
                        "daemon_steps": {d.role + "@" + d.host: d.step_id for d in c.daemons},
                        "leaders": sorted({d.proc.pid for d in c.daemons}), "roots": c.roots,
                        "logs": [str(d.log_path) for d in c.daemons],
                        "specs": sorted({str(d.step.spec_path) for d in c.daemons}),
                        "nodes": len(c.node_addresses)}
    out[backend]["after_stop"] = {"srun_clients": srun_clients(), "steps": steps(),
                                  "left": procs.members(set(out[backend]["leaders"]), c.roots)}
print("RESULT " + json.dumps(out), flush=True)
"""


@slurm
@pytest.mark.cluster
def test_all_workers_of_a_role_run_in_one_srun_step(tmp_path):
    """Issue 12: while a Ray and then a Spark cluster runs on 3 nodes, the script's node holds exactly
    2 srun clients (the head's step, the workers' step), and squeue -s shows one step spanning the
    worker nodes (Ray: tsn[2-3]; Spark: tsn[1-3]); after the stop: no client, no step, nothing left."""
    cfg = default_local_config(
        nodes=3, site={"name": "ci", "scheduler": "slurm", "address": {"method": "dns"}},
        ray={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"]}},
        spark={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"], "start": ["-c", "1", "-m", "1G"]}},
    )
    OmegaConf.save(cfg, tmp_path / "toksearch.yaml")
    env = dict(os.environ, TOKSEARCH_CONFIG=str(tmp_path / "toksearch.yaml"), TOKSEARCH_RUN_DIR=str(tmp_path))
    res = subprocess.run(["salloc", "-N3", "srun", "-N1", "--overlap", PY, "-c", STEPS_JOB, "ray,spark"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=500)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[7:])
    script_step = out["script_step"]
    for backend, workers, head_role, worker_role in (("ray", "tsn[2-3]", "ray-head", "ray-worker"),
                                                     ("spark", "tsn[1-3]", "spark-master", "spark-worker")):
        got = out[backend]
        assert got["nodes"] == 3
        assert len(got["srun_clients"]) == 2, got  # 1 for the head + 1 for all workers
        assert sorted(got["srun_clients"]) == got["leaders"]  # the clients are the daemons' shared leaders
        cluster_steps = {sid: nodes for sid, nodes in got["steps"] if sid != script_step}
        assert len(cluster_steps) == 2, got["steps"]
        assert sorted(cluster_steps.values()) == sorted(["tsn1", workers]), got["steps"]
        by_role = {}
        for key, sid in got["daemon_steps"].items():
            by_role.setdefault(key.split("@")[0], set()).add(sid)
        assert by_role[head_role] != by_role[worker_role] and len(by_role[worker_role]) == 1  # every worker: one step
        [worker_step] = by_role[worker_role]
        assert cluster_steps[worker_step] == workers
        after = got["after_stop"]
        assert after["srun_clients"] == [] and after["left"] == []
        assert [sid for sid, _ in after["steps"]] == [script_step]
        for log in got["logs"]:  # each node's own log: its wrapper stopped its daemon, nothing left
            text = Path(log).read_text()
            assert "nothing left" in text, text[-1500:]
        for spec in got["specs"]:
            assert stat.S_IMODE(os.stat(spec).st_mode) == 0o600
