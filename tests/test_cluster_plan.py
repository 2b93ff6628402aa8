"""Unit tests of the cluster starters without daemons: placement, address rules, ports,
command building, redaction, pre-flight checks, the node wrapper and the dry run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toksearch_launch.cluster import ClusterError, default_local_config, job_cluster, plan_commands
from toksearch_launch.cluster import auth, dirs, launcher, placement, plan as planmod, ports, procs
from toksearch_launch.cluster import preflight as preflightmod, ray as rayb
from toksearch_launch.config import as_typed

REPO = Path(__file__).resolve().parents[1]


def site_cfg(profile: str, **over) -> OmegaConf:
    tree = OmegaConf.load(REPO / "conf" / "site" / f"{profile}.yaml")
    return as_typed(OmegaConf.merge(tree, over))


# ------------------------------------------------------------------ placement


def test_expand_nodelist_uses_slurm_syntax():
    assert placement.expand_nodelist("saga[1-3,10]") == ["saga1", "saga2", "saga3", "saga10"]
    assert placement.expand_nodelist("tsn[01-02],gpu7") == ["tsn01", "tsn02", "gpu7"]
    with pytest.raises(ClusterError):
        placement.expand_nodelist("saga[1-")


def test_job_hosts_local_and_slurm():
    assert placement.job_hosts("local", 3) == ["local1", "local2", "local3"]
    assert placement.job_hosts("slurm", 1, env={"SLURM_JOB_NODELIST": "n[1-2]"}) == ["n1", "n2"]
    with pytest.raises(ClusterError, match="SLURM_JOB_NODELIST"):
        placement.job_hosts("slurm", 1, env={})


def test_script_node_hosts_the_head():
    hosts = ["n1", "n2", "n3"]
    assert placement.script_host(hosts, "slurm", env={"SLURMD_NODENAME": "n2"}) == "n2"
    with pytest.raises(ClusterError, match="not one of the job's nodes"):
        placement.script_host(hosts, "slurm", env={"SLURMD_NODENAME": "login9"})
    ray = placement.place("ray", hosts, "n2")
    assert ray.head == "n2" and ray.hosts == ["n2", "n1", "n3"]
    assert ray.workers == ["n1", "n3"]  # Ray: the other N-1
    spark = placement.place("spark", hosts, "n2")
    assert spark.workers == ["n2", "n1", "n3"]  # Spark: all N


# ------------------------------------------------------------------ addresses


def test_suffix_rule_matches_exact_entry_only(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "10.0.0.10 saga10 saga10-ib  # saga10 first: a prefix match would take it\n"
        "10.0.1.10 saga10-ib.ib.local\n"
        "10.0.0.1  saga1\n"
        "# 10.9.9.9 saga1-ib (commented out)\n"
        "fe80::1 saga1-ib\n"
        "10.1.0.1  saga1-ib saga1-ib.ib.local\n"
    )
    rule = OmegaConf.create({"method": "suffix", "suffix": "-ib", "hosts_file": str(hosts)})
    assert placement.resolve_address("saga1", 0, rule, on_this_node=False) == "10.1.0.1"
    assert placement.resolve_address("saga10", 1, rule, on_this_node=False) == "10.0.0.10"
    with pytest.raises(ClusterError, match="no entry 'saga2-ib'"):
        placement.resolve_address("saga2", 2, rule, on_this_node=False)


def test_loopback_rule_skips_127_0_0_1():
    rule = OmegaConf.create({"method": "loopback"})
    assert [placement.resolve_address(f"local{k}", k - 1, rule, on_this_node=True) for k in (1, 2, 3)] == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_dns_rule_refuses_loopback_only_names():
    with pytest.raises(ClusterError, match="loopback"):
        placement.dns_address("localhost")
    with pytest.raises(ClusterError, match="cannot resolve"):
        placement.dns_address("no-such-node.invalid")


def test_interface_rule_local_and_remote():
    rule = OmegaConf.create({"method": "interface", "interface": "lo"})
    assert placement.resolve_address("n1", 0, rule, on_this_node=True) == "127.0.0.1"
    assert placement.resolve_address("n2", 1, rule, on_this_node=False) is None  # the node resolves it
    with pytest.raises(ClusterError, match="no network interface"):
        placement.interface_address("nosuchif0")


# ------------------------------------------------------------------ ports


@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_local_port_blocks_distinct_per_node(backend):
    plan = ports.plan_ports(backend, 3, 25000, shared_host=True)
    per_node = [set(plan.ports_of_node(i)) for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not per_node[i] & per_node[j]
    every = plan.all_ports()
    assert len(every) == sum(len(s) for s in per_node)
    assert min(every) >= 25000 and max(every) < 25000 + plan.size
    assert 6379 not in every and 7077 not in every


def test_slurm_port_block_shared_by_nodes():
    plan = ports.plan_ports("ray", 50, 20000, shared_host=False)
    assert plan.nodes[0] == plan.nodes[49]
    assert plan.size == 10 + 6 + rayb.WORKER_PORTS_SLURM
    names = set(plan.head) | set(plan.nodes[0])
    assert {"gcs", "client_server", "dashboard", "autoscaler_metrics", "dashboard_metrics",
            "node_manager", "object_manager", "agent_http", "agent_grpc", "metrics",
            "runtime_env_agent", "min_worker", "max_worker"} <= names
    assert "same ports on every node" in plan.describe()


def test_choose_block_free_reserved_and_below_ephemeral():
    size = 40
    a = ports.choose_block(size, "auto")
    b = ports.choose_block(size, "auto")
    try:
        assert a + size <= b or b + size <= a  # never overlap within a process
        lo, hi = ports.auto_range()
        assert lo <= a and a + size <= hi
        assert ports.busy_ports(list(range(a, a + size))) == []
    finally:
        ports.release_block(a)
        ports.release_block(b)


def test_fixed_block_in_use_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        assert not ports.port_free(port)
        with pytest.raises(ClusterError, match=rf"ports {port}\b.*in use"):
            ports.choose_block(10, "fixed", port)
    finally:
        s.close()


def test_auto_block_skips_busy_ports():
    import random

    class Rng:  # first offer a block with a busy port in it, then random ones
        def __init__(self):
            self.calls = 0
            self.real = random.Random()

        def randrange(self, lo, hi):
            self.calls += 1
            return 30000 if self.calls == 1 else self.real.randrange(lo, hi)

    s = socket.socket()
    s.bind(("0.0.0.0", 30005))
    s.listen()
    rng = Rng()
    try:
        base = ports.choose_block(20, "auto", rng=rng)
        ports.release_block(base)
    finally:
        s.close()
    assert base != 30000 and rng.calls >= 2


def test_compress_expand_ports():
    assert ports.compress_ports([5, 1, 2, 3, 7, 8]) == "1-3,5,7-8"
    assert ports.expand_ports("1-3,5,7-8") == [1, 2, 3, 5, 7, 8]


# ------------------------------------------------------------------ commands


def _plan(backend, cfg, hosts, tmp_path, monkeypatch, env=None):
    monkeypatch.setattr(planmod, "job_secret", lambda kind, make=None: "S3CRET-" + kind)
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    return planmod.make_plan(backend, cfg, hosts, tmp_path)


def test_ray_commands_local(tmp_path, monkeypatch):
    cfg = default_local_config(nodes=3, ray={"worker": {"start": ["--resources", "{}"]}})
    plan = _plan("ray", cfg, ["local1", "local2", "local3"], tmp_path, monkeypatch)
    ds = launcher.daemons_of(plan)
    assert [d.role for d in ds] == ["ray-head", "ray-worker", "ray-worker"]
    head, w1 = ds[0].argv, ds[1].argv
    assert head[0] == str(Path(sys.executable).with_name("ray"))
    gcs = plan.ports.head["gcs"]
    assert head[1:9] == ["start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(gcs),
                         "--temp-dir", plan.node_dir(0)]
    assert head[-1] == "--block" and w1[-1] == "--block"
    assert w1[1:7] == ["start", "--node-ip-address", "127.0.0.3", "--address", f"127.0.0.2:{gcs}", "--temp-dir"]
    assert w1[-3:-1] == ["--resources", "{}"]  # user options last, before --block: they win
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                 "--min-worker-port", "--max-worker-port", "--num-cpus", "--object-store-memory"):
        assert flag in head and flag in w1
    for flag in ("--ray-client-server-port", "--dashboard-port", "--dashboard-host"):
        assert flag in head
    assert ds[0].env["AUTOSCALER_METRIC_PORT"] == str(plan.ports.head["autoscaler_metrics"])
    assert ds[0].env["DASHBOARD_METRIC_PORT"] == str(plan.ports.head["dashboard_metrics"])
    assert ds[0].env["RAY_AUTH_MODE"] == "token"
    assert ds[0].env["RAY_AUTH_TOKEN_PATH"] == plan.secret_file
    assert ds[0].env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"
    assert ds[1].log_path == tmp_path / "logs" / "ray-worker-local2.log"
    every = " ".join(" ".join(d.argv) + " ".join(d.env.values()) for d in ds)
    assert "S3CRET" not in every  # local: the token only in the 0600 file
    assert len(plan.root) <= dirs.MAX_TMP_DIR


def test_spark_commands_slurm(tmp_path, monkeypatch):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("10.1.0.1 n1-ib\n10.1.0.2 n2-ib\n10.1.0.10 n10-ib\n")
    cfg = site_cfg("saga", nodes=2, site={"address": {"hosts_file": str(hosts_file)}})
    plan = _plan("spark", cfg, ["n1", "n10"], tmp_path, monkeypatch, env={"SLURMD_NODENAME": "n10"})
    ds = launcher.daemons_of(plan)
    assert [(d.role, d.host) for d in ds] == [("spark-master", "n10"), ("spark-worker", "n10"),
                                             ("spark-worker", "n1")]
    m = ds[0].argv
    # the master is its own one-node step, with the role's srun options; the workers share one step
    assert ds[0].step.argv[:11] == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--nodelist=n10", "--export=ALL",
                                    "--kill-on-bad-exit=0", "--wait=0", "--label", "--gres=gpu:volta:0", "--overlap"]
    assert ds[1].step is ds[2].step and ds[1].step.argv[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                                                "--nodelist=n[1,10]"]
    assert m[:3] == [sys.executable, "-m", "toksearch_launch.cluster.node"]
    tail = m[m.index("--") + 1:]
    assert tail[1:] == ["org.apache.spark.deploy.master.Master", "--host", "10.1.0.10", "--port",
                        str(plan.ports.head["master"]), "--webui-port", str(plan.ports.head["master_ui"])]
    assert tail[0].endswith("bin/spark-class")
    w = ds[2].argv
    wt = w[w.index("--") + 1:]
    assert wt[1:4] == ["org.apache.spark.deploy.worker.Worker", "--host", "10.1.0.1"]
    # -c and -m: the node's allocation, filled in by its step wrapper (saga no longer hard-codes 48 and 149G)
    assert wt[-5:] == ["-c", "@NODE_CPUS@", "-m", "@NODE_SPARK_MEMORY@", f"spark://10.1.0.10:{plan.ports.head['master']}"]
    assert w[w.index("--ip-env") + 1] == "SPARK_LOCAL_IP" and "--check-ports" in w and ["--ip", "10.1.0.1"] == w[w.index("--ip"):w.index("--ip") + 2]
    # the master and the worker on n10 never share a dir (each wrapper removes its own)
    assert ds[0].argv[ds[0].argv.index("--dir") + 1] != ds[1].argv[ds[1].argv.index("--dir") + 1]
    assert "-Dspark.master.rest.enabled=false" in ds[0].env["SPARK_MASTER_OPTS"]
    assert "-Dspark.port.maxRetries=0" in ds[0].env["SPARK_MASTER_OPTS"]
    assert "-Dspark.authenticate=true" in ds[2].env["SPARK_WORKER_OPTS"]
    assert ds[2].env["_SPARK_AUTH_SECRET"] == "S3CRET-spark"
    assert ds[2].env["SPARK_LOCAL_IP"] == "10.1.0.1"
    assert all("S3CRET" not in " ".join(d.argv) for d in ds)


def test_interface_rule_resolved_by_node_wrapper(tmp_path, monkeypatch):
    cfg = site_cfg("default", nodes=2, site={"address": {"method": "interface", "interface": "lo"}})
    plan = _plan("ray", cfg, ["n1", "n2"], tmp_path, monkeypatch, env={"SLURMD_NODENAME": "n1"})
    head, worker = launcher.daemons_of(plan)
    assert "--ip" in head.argv and head.argv[head.argv.index("--ip") + 1] == "127.0.0.1"
    assert worker.argv[worker.argv.index("--interface") + 1] == "lo"
    tail = worker.argv[worker.argv.index("--") + 1:]
    assert tail[tail.index("--node-ip-address") + 1] == placement.NODE_IP
    assert worker.env[auth.SECRET_VALUE_ENV] == "S3CRET-ray"  # the wrapper writes it to a 0600 file
    assert worker.env[auth.SECRET_FILE_ENV] == plan.secret_file


# ------------------------------------------------------------------ redaction & dry run


def test_redact_secret_options():
    argv = ["x", "--redis-password", "pw", "--auth-token=abc", "-Dspark.authenticate.secret=s", "--port", "1"]
    assert procs.redact(argv) == ["x", "--redis-password", "<redacted>", "--auth-token=<redacted>",
                                  "-Dspark.authenticate.secret=<redacted>", "--port", "1"]
    assert "pw" not in procs.display(argv)


def test_plan_commands_dry_run_is_pure_and_redacted():
    code = (
        "import sys, json\n"
        "from omegaconf import OmegaConf\n"
        "from toksearch_launch.config import as_typed\n"
        "from toksearch_launch.cluster import plan_commands\n"
        "cfg = as_typed(OmegaConf.merge(OmegaConf.load('conf/site/saga.yaml'), {'nodes': 3,\n"
        "    'ray': {'master': {'start': ['--redis-password=hunter2']}}}))\n"
        "out = {b: plan_commands(b, cfg, ['node1', 'node2', 'node3']) for b in ('ray', 'spark')}\n"
        "bad = [m for m in ('ray', 'pyspark', 'psutil') if m in sys.modules]\n"
        "print(json.dumps({'out': out, 'imported': bad}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    import json

    data = json.loads(res.stdout)
    assert data["imported"] == []
    ray_cmds, spark_cmds = data["out"]["ray"], data["out"]["spark"]
    # one step per role, then what each node's wrapper runs: head step + 1, worker step + 2 (spark: + 3)
    assert len(ray_cmds) == 5 and len(spark_cmds) == 6
    text = json.dumps(data["out"])
    assert "hunter2" not in text and "<redacted>" in text
    assert "<IP:node1>" in text and "<port:gcs>" in text and "tsl-XXXXXX" in text
    assert ray_cmds[2][:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=node[2-3]"]
    assert ray_cmds[2][-2:] == ["--spec", "/tmp/run/steps/tsl-XXXXXX-ray-worker.json"]
    tail = ray_cmds[1][ray_cmds[1].index("--") + 1:]
    assert tail[1:4] == ["start", "--head", "--node-ip-address"]


def test_plan_commands_local_fixed_ports():
    cfg = default_local_config(nodes=2, site={"ports": {"policy": "fixed", "base": 30000}})
    cmds = plan_commands("spark", cfg, ["local1", "local2"])
    assert cmds[0][1:] == ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.2",
                           "--port", "30000", "--webui-port", "30001"]
    assert cmds[2][-1] == "spark://127.0.0.2:30000"
    assert all(c[0] != "srun" for c in cmds)


# ------------------------------------------------------------------ pre-flight


def test_preflight_long_tmp_dir(tmp_path, monkeypatch):
    base = tmp_path / ("x" * 40)
    base.mkdir()
    cfg = default_local_config(nodes=2, site={"tmp_base": str(base)})
    plan = _plan("ray", cfg, ["local1", "local2"], tmp_path, monkeypatch)
    with pytest.raises(ClusterError, match="Unix sockets"):
        preflightmod.preflight("ray", cfg, plan)


def test_preflight_object_store_larger_than_shm(tmp_path, monkeypatch):
    cfg = default_local_config(nodes=2, ray={"worker": {"start": ["--object-store-memory=9e15"]}})
    plan = _plan("ray", cfg, ["local1", "local2"], tmp_path, monkeypatch)
    with pytest.raises(ClusterError, match="/dev/shm"):
        preflightmod.preflight("ray", cfg, plan)
    cfg = site_cfg("saga", nodes=2, ray={"master": {"start": ["--object-store-memory=95000000000"]}})
    plan.scheduler = "slurm"
    monkeypatch.setattr(rayb, "shm_bytes", lambda: 10 ** 9)
    with pytest.raises(ClusterError, match="ray.master.start .*larger than /dev/shm"):
        preflightmod.preflight("ray", cfg, plan)


def test_preflight_java_and_packages_missing(monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClusterError, match="Java is missing"):
        preflightmod.preflight("spark", default_local_config())
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ray", "pyspark") else real(name, *a))
    with pytest.raises(ClusterError, match="Ray is not installed"):
        preflightmod.preflight("ray", default_local_config())
    with pytest.raises(ClusterError, match="PySpark is not installed"):
        preflightmod.preflight("spark", default_local_config())


def test_job_cluster_outside_a_job(monkeypatch):
    monkeypatch.delenv("TOKSEARCH_CONFIG", raising=False)
    assert job_cluster("ray") is None
    with pytest.raises(ClusterError, match="unknown cluster backend"):
        job_cluster("nosuch")


def test_job_cluster_inside_a_daemon_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKSEARCH_CONFIG", str(tmp_path / "toksearch.yaml"))
    monkeypatch.setenv(auth.DAEMON_ENV, "ray")
    assert job_cluster("ray") is None


# ------------------------------------------------------------------ node wrapper (no daemons)

_SPAWNER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print('child up', flush=True)\n"
    "time.sleep(300)\n"
)


def test_node_wrapper_stops_session_and_removes_dir(tmp_path):
    root = tmp_path / "tsl-test"
    ndir = root / "r1"
    secret_file = str(root / "ray-secret")
    env = dict(os.environ, **{auth.SECRET_VALUE_ENV: "s3", auth.SECRET_FILE_ENV: secret_file})
    p = subprocess.Popen(
        [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", str(root), "--dir", str(ndir),
         "--ip", "127.0.0.9", "--", sys.executable, "-c", _SPAWNER],
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    first = p.stdout.readline()
    assert first.startswith("toksearch-node: host=") and "address=127.0.0.9" in first
    assert p.stdout.readline().strip() == "child up"
    assert oct(os.stat(secret_file).st_mode & 0o777) == "0o600"
    assert oct(os.stat(root).st_mode & 0o777) == "0o700"
    import psutil

    kids = psutil.Process(p.pid).children(recursive=True)
    assert len(kids) == 2
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=15)[0]
    assert time.monotonic() - t < 10
    assert "nothing left" in out, out
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
    assert not ndir.exists() and not os.path.exists(secret_file)


def test_node_wrapper_busy_port(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        res = subprocess.run(
            [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", str(tmp_path / "r"),
             "--dir", str(tmp_path / "r" / "x"), "--ip", "127.0.0.1", "--check-ports", f"{port}",
             "--", "true"],
            capture_output=True, text=True, cwd=REPO, timeout=30,
        )
    finally:
        s.close()
    assert res.returncode == 75
    assert f"port {port} is busy" in res.stdout
    assert procs.PORT_CONFLICT.search(res.stdout)
