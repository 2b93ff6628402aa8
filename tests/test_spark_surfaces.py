"""Spark's web UIs are locked down (issue 11 item 7): no kill through them, bound to the node's address.

A real Spark standalone cluster on site=local (2 nodes: 127.0.0.2 and 127.0.0.3) with a real
driver: the master UI's kill and decommission endpoints are refused and the application and the
workers survive them; every socket a Spark process we started listens on is on a node address.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from toksearch_launch.cluster import Cluster, procs
from toksearch_launch.cluster.site import default_local_config

NODE_ADDRESSES = {"127.0.0.2", "127.0.0.3"}
#: no proxy, whatever the environment says: the UI is on a cluster-internal address
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, form: dict) -> int:
    """POST a form, as the UI's kill button does; the HTTP status (no redirect followed)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
    try:
        body = urllib.parse.urlencode(form).encode()
        with opener.open(urllib.request.Request(url, data=body, method="POST"), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _master_state(ui: str) -> dict:
    with DIRECT.open(f"{ui}/json/", timeout=10) as resp:
        return json.load(resp)


def _listening(pids: list[int]) -> dict[int, set[tuple[str, int]]]:
    """pid -> the (address, port) pairs it listens on (TCP)."""
    import psutil

    out: dict[int, set[tuple[str, int]]] = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # a JVM's sockets are dual-stack: 127.0.0.2 reads ::ffff:127.0.0.2 (still that address only)
        out[pid] = {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in conns
                    if c.status == psutil.CONN_LISTEN}
    return out


def test_every_spark_process_gets_the_ui_locks(tmp_path):
    """The settings themselves, on each role (the test below shows what they do)."""
    from toksearch_launch.cluster import launcher, spark
    from toksearch_launch.cluster.plan import make_plan

    plan = make_plan("spark", default_local_config(nodes=2), ["local1", "local2"], tmp_path)
    master, *workers = launcher.daemons_of(plan)
    assert "-Dspark.ui.killEnabled=false" in master.env["SPARK_MASTER_OPTS"].split()
    assert "-Dspark.master.ui.decommission.allow.mode=DENY" in master.env["SPARK_MASTER_OPTS"].split()
    assert [w.env["SPARK_LOCAL_IP"] for w in workers] == ["127.0.0.2", "127.0.0.3"]
    assert master.env["SPARK_LOCAL_IP"] == "127.0.0.2"
    for w in workers:
        assert "-Dspark.ui.killEnabled=false" in w.env["SPARK_WORKER_OPTS"].split()
    driver = spark.driver_conf(plan)
    assert (driver["spark.ui.killEnabled"], driver["spark.ui.enabled"]) == ("false", "false")


@pytest.mark.cluster
def test_spark_ui_kill_is_refused_and_every_ui_binds_the_node_address(tmp_path):
    c = Cluster("spark", default_local_config(nodes=2), run_dir=tmp_path)
    try:
        c.start()
        head = c.plan.ports.head
        ui = f"http://{c.plan.head_ip}:{head['master_ui']}"
        spark = c.connect(app_name="victim")
        assert spark.sparkContext.parallelize(range(100), 4).sum() == 4950  # executors are up
        [app] = _master_state(ui)["activeapps"]
        assert app["name"] == "victim"

        # an attacker who reaches the master UI: read the page, take the kill form's CSRF token
        # (Spark 4 wants one), post the form. With killEnabled on: a 302 and the app is KILLED.
        with DIRECT.open(f"{ui}/", timeout=10) as resp:
            page = resp.read().decode()
        tokens = re.findall(r'name="csrfToken" value="([^"]+)"', page)
        assert "app/kill" not in page and tokens == []  # no kill form at all
        form = {"id": app["id"], "terminate": "true", "csrfToken": tokens[0] if tokens else "none"}
        kill = _post(f"{ui}/app/kill/", form)
        # decommissioning a worker from the UI (POST /workers/kill/?host=...)
        decommission = _post(f"{ui}/workers/kill/", {"host": "127.0.0.3", "csrfToken": form["csrfToken"]})
        print("STATUS kill", kill, "decommission", decommission)
        assert kill in (403, 404, 405), kill
        assert decommission in (403, 404, 405), decommission

        state = _master_state(ui)
        assert [a["id"] for a in state["activeapps"]] == [app["id"]]
        assert state["activeapps"][0]["state"] == "RUNNING"
        assert sorted(w["host"] for w in state["workers"] if w["state"] == "ALIVE") == sorted(NODE_ADDRESSES)
        assert spark.sparkContext.parallelize(range(10), 2).sum() == 45  # the application still works

        # every listening socket of every Spark process we started (daemons, executors, Python
        # daemons, the driver JVM): on a node address, none on 0.0.0.0 / ::
        from pyspark import SparkContext

        driver_jvm = SparkContext._gateway.proc.pid
        started = {d.proc.pid for d in c.daemons}
        pids = sorted(set(procs.members(started, [c.plan.root])) | started | {driver_jvm})
        listening = _listening(pids)
        print("LISTENING", {pid: sorted(pairs) for pid, pairs in listening.items()})
        everything = {addr for pairs in listening.values() for addr in pairs}
        wildcard = sorted(a for a in everything if a[0] in ("0.0.0.0", "::", ""))
        assert not wildcard, listening
        ui_ports = {head["master_ui"], *(slot["worker_ui"] for slot in c.plan.ports.nodes)}
        ui_sockets = {a for a in everything if a[1] in ui_ports}
        assert ui_sockets == {(c.plan.head_ip, head["master_ui"]),
                              *((ip, slot["worker_ui"]) for ip, slot in zip(c.node_addresses, c.plan.ports.nodes))}
        # outside the UIs only the node addresses, and loopback for PySpark's worker daemons
        assert {a[0] for a in everything} <= NODE_ADDRESSES | {"127.0.0.1"}, everything
    finally:
        c.stop()
    assert c.leftovers == []
