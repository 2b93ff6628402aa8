"""Real Ray and Spark daemons on this machine (site=local): start, use every node, refuse
clients without the secret, fail fast on a bad option, stop with nothing left.

Each test reuses one cluster for several checks to keep the file's runtime modest
on a 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from toksearch_launch.cluster import Cluster, StartError, default_local_config
from toksearch_launch.cluster import procs

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------ helpers


#: The environment before any cluster connected this process (connect() must undo its changes).
ENV_BEFORE = dict(os.environ)

def nothing_left(cluster: Cluster) -> None:
    """No process in any session we started, marked with or naming any temp dir we used; dirs removed."""
    left = procs.members(set(cluster.started_pids), cluster.roots)
    assert left == [], [(p, psutil.Process(p).cmdline()[:4]) for p in left if psutil.pid_exists(p)]
    for root in cluster.roots:
        assert not os.path.exists(root), root
        assert not named(root)


def named(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a check only: nothing is killed by it)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["pid"] != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
            if text in " ".join(p.info["cmdline"] or ()):
                out.append(p.info["pid"])
    return out


def listening(pid: int) -> list[tuple[str, int]]:
    try:
        return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


def owned_by(owner_pid: int) -> list[int]:
    """Every live process whose owner marker names ``owner_pid``: step wrappers, their daemons'
    sessions, probes (the daemons run in sessions of their own under the wrappers)."""
    from toksearch_launch.cluster.owner import OWNER_ENV

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(OWNER_ENV, "").split(":")[1:2] == [str(owner_pid)]:
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


def no_argv_contains(secret: str) -> None:
    for p in psutil.process_iter(["pid", "cmdline"]):
        assert secret not in " ".join(p.info["cmdline"] or ()), f"secret on the argv of pid {p.info['pid']}"


def write_job_config(path: Path, **over) -> Path:
    OmegaConf.save(default_local_config(**over), path)
    return path


class Reader:
    """Collects a child's output lines in the background (to wait for one with a deadline)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.proc = proc
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(ln) for ln in self.lines):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return any(pred(ln) for ln in self.lines)
            time.sleep(0.1)
        return False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# ------------------------------------------------------------------ Ray

EAGER_RAY_SCRIPT = r"""
import json, os, ray
ray.init()  # RAY_ADDRESS + token come from the eager wrapper
alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()
seen = ray.get([where.options(resources={"node:" + ip: 0.01}).remote() for ip in alive])
from toksearch_launch.cluster import job_cluster
c = job_cluster("ray")  # attaches to the eager wrapper's cluster
print("RESULT " + json.dumps({"alive": sorted(alive), "seen": sorted(seen), "address": os.environ["RAY_ADDRESS"],
      "token_path": os.environ["RAY_AUTH_TOKEN_PATH"], "attached": [c.address, c.num_cpus]}), flush=True)
"""


def test_ray_two_clusters_tasks_on_every_node_auth_and_teardown(tmp_path):
    # cluster B: the eager wrapper in another process, started at the same moment as A
    cfg_b = write_job_config(tmp_path / "b.yaml", nodes=2)
    env_b = dict(os.environ, TOKSEARCH_CONFIG=str(cfg_b), TOKSEARCH_RUN_DIR=str(tmp_path / "run-b"))
    eager = subprocess.Popen(
        [PY, "-m", "toksearch_launch.cluster.eager", "--backend", "ray", "--", PY, "-c", EAGER_RAY_SCRIPT],
        cwd=REPO, env=env_b, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out_b = Reader(eager)
    a = Cluster("ray", default_local_config(nodes=3), run_dir=tmp_path / "run-a")
    t0 = time.monotonic()
    try:
        a.start()
        started = time.monotonic() - t0
        assert a.node_addresses == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert a.num_cpus == 3
        assert a.address == f"127.0.0.2:{a.plan.ports.head['gcs']}"

        # a task pinned to each node runs there
        import ray

        a.connect()

        @ray.remote(num_cpus=1)
        def where():
            return ray.util.get_node_ip_address()

        seen = ray.get([where.options(resources={f"node:{ip}": 0.01}).remote() for ip in a.node_addresses])
        assert seen == a.node_addresses

        # every port any of A's processes listens on is in A's block
        block = set(a.plan.ports.all_ports())
        ports_seen = {port for pid in owned_by(os.getpid()) for _, port in listening(pid)}
        assert ports_seen and ports_seen <= block, sorted(ports_seen - block)

        # secrets: 0600 token file in a 0700 short temp dir, never on any argv, not in client_env
        root = a.plan.root
        assert len(a.plan.longest_node_dir()) <= 40
        assert oct(os.stat(root).st_mode & 0o777) == "0o700"
        assert oct(os.stat(a.plan.secret_file).st_mode & 0o777) == "0o600"
        token = Path(a.plan.secret_file).read_text()
        no_argv_contains(token)
        assert token not in json.dumps(a.client_env())

        # a client without the token is refused (Ray retries 20 s by default: one try here)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(tmp_path), RAY_gcs_server_port_wait_time_s="1")
        t = time.monotonic()
        res = subprocess.run([PY, "-c", f"import ray; ray.init(address='{a.address}')"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert "InvalidAuthToken" in res.stdout + res.stderr
        assert time.monotonic() - t < 30

        # logs: one per daemon, and the cluster log with addresses, ports, timings
        logs = a.run_dir / "logs"
        assert (logs / "ray-head-local1.log").exists() and (logs / "ray-worker-local3.log").exists()
        clog = (logs / "ray-cluster.log").read_text()
        assert "local2=127.0.0.3" in clog and f"gcs={a.plan.ports.head['gcs']}" in clog
        assert "head up after" in clog and "all workers registered" in clog

        # cluster B worked too, on other ports
        assert eager.wait(timeout=180) == 0, out_b.text[-3000:]
        result = json.loads(next(ln for ln in out_b.lines if ln.startswith("RESULT "))[7:])
        assert result["alive"] == result["seen"] == ["127.0.0.2", "127.0.0.3"]
        assert result["address"] != a.address
        assert result["attached"] == [result["address"], 2]
        root_b = os.path.dirname(result["token_path"])
        assert not os.path.exists(root_b)
        assert procs.members(set(), [root_b]) == [] and named(root_b) == []
    finally:
        if eager.poll() is None:
            eager.kill()
        t = time.monotonic()
        a.stop()
        stop_time = time.monotonic() - t
    assert stop_time < 10
    nothing_left(a)
    assert not any(k.startswith("RAY_AUTH") for k in os.environ if k not in ENV_BEFORE), "connect() env not undone"
    print(f"\nray: 3 nodes ready in {started:.1f} s beside a 2-node cluster; stop {stop_time:.1f} s")


def test_ray_bad_worker_option_fails_fast_and_cleans_up(tmp_path):
    cfg = default_local_config(nodes=2, site={"ready_timeout": 120}, ray={"worker": {"start": ["--bogus-flag"]}})
    c = Cluster("ray", cfg, run_dir=tmp_path)
    t = time.monotonic()
    with pytest.raises(StartError) as err:
        c.start()
    elapsed = time.monotonic() - t
    msg = str(err.value)
    assert elapsed < 120, elapsed  # the worker's exit ended the start, not the ready deadline
    assert "ray-worker on node local2 exited with code" in msg
    assert "--bogus-flag" in msg and str(tmp_path / "logs" / "ray-worker-local2.log") in msg
    assert "No such option" in msg  # the last lines of the worker's log
    assert len(c.started_pids) == 2
    nothing_left(c)


def test_worker_that_never_registers_fails_at_the_deadline(tmp_path):
    # the user's --address (last wins) aims the worker at a GCS that does not exist: it
    # retries forever, so only our deadline ends the start
    cfg = default_local_config(nodes=2, site={"ready_timeout": 30},
                               ray={"worker": {"start": ["--address", "127.0.0.2:9"]}})
    c = Cluster("ray", cfg, run_dir=tmp_path)
    t = time.monotonic()
    with pytest.raises(StartError) as err:
        c.start()
    elapsed = time.monotonic() - t
    msg = str(err.value)
    assert elapsed >= 30, elapsed  # the deadline ended it, not the head (which may take >8 s on a busy 2-core machine)
    assert "1 of 2 nodes registered within site.ready_timeout=30 s" in msg
    assert "ray-worker on node local2 never registered" in msg and "127.0.0.2:9" in msg
    nothing_left(c)


JOB_SCRIPT = r"""
import json, time
from toksearch_launch.cluster import job_cluster
c = job_cluster("ray")
print("READY " + json.dumps({"pids": c.started_pids, "roots": c.roots, "nodes": c.node_addresses}), flush=True)
time.sleep(300)
"""

EAGER_SLEEP = r"""
import json, os, signal, sys, time
from toksearch_launch.cluster import job_cluster
c = job_cluster("ray")
print("READY " + json.dumps({"nodes": c.node_addresses, "env": os.environ["RAY_AUTH_TOKEN_PATH"]}), flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("CHILD GOT SIGTERM", flush=True), sys.exit(7)))
time.sleep(300)
"""


@pytest.mark.parametrize("how,sig,nodes", [
    ("lazy", signal.SIGTERM, 2),   # scancel's first signal
    ("lazy", signal.SIGINT, 1),    # Ctrl-C: KeyboardInterrupt, then the exit hook
    ("eager", signal.SIGTERM, 1),  # the wrapper forwards it, waits for COMMAND, then stops
])
def test_signal_to_job_process_stops_its_cluster(tmp_path, how, sig, nodes):
    cfg = write_job_config(tmp_path / "toksearch.yaml", nodes=nodes)
    env = dict(os.environ, TOKSEARCH_CONFIG=str(cfg), TOKSEARCH_RUN_DIR=str(tmp_path))
    if how == "lazy":
        argv = [PY, "-c", JOB_SCRIPT]
    else:
        argv = [PY, "-m", "toksearch_launch.cluster.eager", "--backend", "ray", "--", PY, "-c", EAGER_SLEEP]
    # SIGINT as at a terminal: a shell's background job (CI started with `&`) inherits it ignored
    p = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = Reader(p)
    try:
        assert out.wait_for(lambda ln: ln.startswith("READY "), 150), out.text[-3000:]
        info = json.loads(next(ln for ln in out.lines if ln.startswith("READY "))[6:])
        assert len(info["nodes"]) == nodes
        if how == "lazy":
            pids, roots = info["pids"], info["roots"]
        else:  # the cluster is the wrapper's: find it by the token file's dir
            pids, roots = [], [os.path.dirname(info["env"])]
        assert procs.members(set(pids), roots)  # running
        t = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(timeout=20)
        elapsed = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
    if how == "eager":
        assert "CHILD GOT SIGTERM" in out.text and rc == 7, out.text[-2000:]
    elif sig == signal.SIGTERM:
        assert rc == -signal.SIGTERM  # died of the signal it got, after the teardown
    else:
        assert rc in (-signal.SIGINT, 1, 130), rc
    assert elapsed < 10, elapsed
    assert procs.members(set(pids), roots) == []
    assert not any(os.path.exists(r) or named(r) for r in roots)


# ------------------------------------------------------------------ Spark

INTRUDER = r"""
import sys
from pyspark.sql import SparkSession
s = SparkSession.builder.master(sys.argv[1]).appName("intruder").getOrCreate()
print("INTRUDER GOT IN", s.sparkContext.parallelize(range(4)).sum(), flush=True)
"""


def test_spark_executors_on_every_worker_auth_and_teardown(tmp_path):
    c = Cluster("spark", default_local_config(nodes=2), run_dir=tmp_path)
    intruder = None
    try:
        t0 = time.monotonic()
        c.start()
        started = time.monotonic() - t0
        assert c.node_addresses == ["127.0.0.2", "127.0.0.3"]
        assert c.num_cpus == 2
        assert c.address == f"spark://127.0.0.2:{c.plan.ports.head['master']}"
        secret = c.plan.secret

        # a driver without the secret: the master refuses it (real refusal, seen in seconds)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_", "PYSPARK_"))}
        intruder = subprocess.Popen([PY, "-c", INTRUDER, c.address], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out = Reader(intruder)

        session = c.connect()
        sc = session.sparkContext
        deadline = time.monotonic() + 90
        while sc._jsc.sc().getExecutorMemoryStatus().size() < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        block_managers = sc._jsc.sc().getExecutorMemoryStatus().keys().mkString(",").split(",")
        hosts = sorted(bm.rsplit(":", 1)[0] for bm in block_managers)
        assert hosts == ["127.0.0.2", "127.0.0.2", "127.0.0.3"], hosts  # driver + one executor per worker

        def where(_):
            import os as _os
            import time as _t

            _t.sleep(0.3)
            return _os.environ.get("SPARK_LOCAL_IP")

        seen = set(sc.parallelize(range(8), 8).map(where).collect())
        assert seen == {"127.0.0.2", "127.0.0.3"}

        # daemon ports in the block; web UIs on the node address, not 0.0.0.0
        block = set(c.plan.ports.all_ports())
        for d in c.daemons:  # d.proc is the step wrapper; the JVM is its child (spark-class execs it)
            ls = [conn for child in psutil.Process(d.proc.pid).children() for conn in listening(child.pid)]
            assert ls and {p for _, p in ls} <= block, (d.label, ls)
            assert all(ip.replace("::ffff:", "") == d.address for ip, _ in ls), (d.label, ls)

        # secret: never on an argv (daemons, executors, drivers); driver conf 0600
        no_argv_contains(secret)
        conf = Path(c.client_env()["SPARK_CONF_DIR"]) / "spark-defaults.conf"
        assert oct(conf.stat().st_mode & 0o777) == "0o600"
        assert secret not in json.dumps(c.client_env())

        assert out.wait_for(lambda ln: "Failed to connect to master" in ln, 60), out.text[-3000:]
        assert out.wait_for(lambda ln: "SaslMessage" in ln or "Mismatched response" in ln, 5)
        assert not any("INTRUDER GOT IN" in ln for ln in out.lines)
        with urllib.request.urlopen(f"http://127.0.0.2:{c.plan.ports.head['master_ui']}/json/") as r:
            apps = [a["name"] for a in json.load(r)["activeapps"]]
        assert apps == ["toksearch"]
        mlog = (tmp_path / "logs" / "spark-master-local1.log").read_text()
        assert "Expected SaslMessage" in mlog
    finally:
        if intruder is not None and intruder.poll() is None:
            os.killpg(intruder.pid, signal.SIGKILL)
            intruder.wait()
        t = time.monotonic()
        c.stop()
        stop_time = time.monotonic() - t
    assert stop_time < 10
    nothing_left(c)
    assert {k: os.environ.get(k) for k in ("SPARK_CONF_DIR", "SPARK_LOCAL_IP", "SPARK_MASTER_URL")} == \
        {k: ENV_BEFORE.get(k) for k in ("SPARK_CONF_DIR", "SPARK_LOCAL_IP", "SPARK_MASTER_URL")}, "connect() env not undone"
    print(f"\nspark: 2 workers ready in {started:.1f} s; stop (session + daemons) {stop_time:.1f} s")
