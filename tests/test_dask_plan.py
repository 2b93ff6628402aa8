"""The Dask backend without daemons: its commands, ports, auth material and registry entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from toksearch_launch.cluster import backend_names, default_local_config, get_backend, plan_commands
from toksearch_launch.cluster import dask as daskb, launcher, plan as planmod
from toksearch_launch.config import as_typed
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def test_dask_is_registered_like_the_others():
    assert backend_names() == ("ray", "spark", "dask")
    engine = get_backend("dask")
    assert engine.workers_on_head and engine.secret_file_on_nodes


def test_local_commands_pin_every_port_inside_the_block(tmp_path):
    cfg = default_local_config(nodes=2, site={"ports": {"policy": "fixed", "base": 30000}},
                               dask={"worker": {"start": ["--resources", "GPU=0"]}})
    plan = planmod.make_plan("dask", cfg, ["local1", "local2"], tmp_path)
    try:
        ds = launcher.daemons_of(plan)
        assert [(d.role, d.host) for d in ds] == [("dask-scheduler", "local1"), ("dask-worker", "local1"),
                                                 ("dask-worker", "local2")]
        sched, w1, w2 = (d.argv for d in ds)
        block = set(range(plan.ports.base, plan.ports.base + plan.ports.size))
        assert sched[sched.index("--port") + 1] == "30000"
        assert sched[sched.index("--dashboard-address") + 1] == "127.0.0.2:30001"
        assert sched[sched.index("--protocol") + 1] == "tls"
        node_ports = []
        for argv, ip in ((w1, "127.0.0.2"), (w2, "127.0.0.3")):
            sup, worker = argv[:argv.index("--")], argv[argv.index("--") + 1:]
            count = int(sup[sup.index("--count") + 1])
            assert count == plan.cpus_per_node
            assert worker[4] == "tls://127.0.0.2:30000" and worker[worker.index("--host") + 1] == ip
            assert worker[-2:] == ["--resources", "GPU=0"]  # user options last: they win
            start = {k: int(sup[sup.index(f"--{k}-port") + 1]) for k in ("nanny", "worker", "http")}
            for k in range(count):
                proc = daskb.worker_process_argv(worker, k, "x", ip, start)
                assert proc[-2:] == ["--resources", "GPU=0"]
                assert proc[proc.index("--nthreads") + 1] == "1"
                http_ip, http = proc[proc.index("--dashboard-address") + 1].split(":")
                assert http_ip == ip
                node_ports += [int(proc[proc.index("--nanny-port") + 1]), int(proc[proc.index("--worker-port") + 1]),
                               int(http)]
        assert set(node_ports) <= block and len(set(node_ports)) == len(node_ports)  # none shared
        for argv in (sched, w1, w2):
            for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
                assert argv[argv.index(flag) + 1] == plan.secret_file
        assert "BEGIN" not in " ".join(" ".join(d.argv) for d in ds)  # the key is never on a command line
        assert all(d.env["TOKSEARCH_CLUSTER_DAEMON"] == "dask" for d in ds)
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_slurm_secret_reaches_each_node_through_the_wrapper(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.0.1 n1-ib\n10.1.0.2 n2-ib\n")
    tree = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "site" / "saga.yaml"),
                           {"nodes": 2, "site": {"address": {"hosts_file": str(hosts)}}})
    plan = planmod.make_plan("dask", as_typed(tree), ["n1", "n2"], tmp_path)
    try:
        ds = launcher.daemons_of(plan)
        assert [d.step.argv[:5] for d in ds] == [["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--nodelist=n1"]] + \
            [["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=n[1-2]"]] * 2
        assert all("--overlap" in d.step.argv for d in ds)  # the schema's default dask.*.srun
        assert ds[2].env["_TOKSEARCH_SECRET"].startswith("-----BEGIN PRIVATE KEY-----")
        assert ds[2].env["_TOKSEARCH_SECRET_FILE"] == plan.secret_file
        assert "--check-ports" in ds[2].argv
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_processes_per_node_follow_the_allocation(tmp_path, monkeypatch):
    from toksearch_launch.cluster.resources import allocated_cpus

    assert allocated_cpus({"SLURM_JOB_CPUS_PER_NODE": "4,2(x2)", "SLURM_JOB_NODELIST": "n[1-3]"}) == \
        {"n1": 4, "n2": 2, "n3": 2}
    assert allocated_cpus({}) == {}
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "3,5")
    cfg = as_typed(OmegaConf.merge(OmegaConf.load(REPO / "conf" / "site" / "default.yaml"),
                                   {"nodes": 2, "site": {"address": {"method": "interface", "interface": "lo"}}}))
    plan = planmod.make_plan("dask", cfg, ["n1", "n2"], tmp_path)
    try:
        assert plan.hosts == ["n2", "n1"]
        assert [daskb.processes_on(plan, i) for i in (0, 1)] == [5, 3]
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_pem_is_a_key_and_a_self_signed_certificate():
    pem = daskb.make_pem()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----") and "-----BEGIN CERTIFICATE-----" in pem
    assert daskb.make_pem() != pem  # fresh per job


def test_client_env_names_files_never_the_key(tmp_path):
    cfg = default_local_config(nodes=1)
    plan = planmod.make_plan("dask", cfg, ["local1"], tmp_path)
    try:
        env = get_backend("dask").client_env(plan)
        assert env["DASK_SCHEDULER_ADDRESS"].startswith("tls://127.0.0.2:")
        assert env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"] == plan.secret_file
        assert not any("BEGIN" in v for v in env.values())
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_dry_run_of_dask_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "from toksearch_launch.cluster import plan_commands, default_local_config\n"
        "out = plan_commands('dask', default_local_config(nodes=3), ['a', 'b', 'c'])\n"
        "print(json.dumps({'n': len(out), 'imported': [m for m in ('dask', 'distributed', 'cryptography') "
        "if m in sys.modules]}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    data = json.loads(res.stdout)
    assert data == {"n": 4, "imported": []}


def test_plan_commands_dask_placeholders():
    cmds = plan_commands("dask", default_local_config(nodes=2), ["local1", "local2"])
    text = " ".join(" ".join(c) for c in cmds)
    assert "<port:scheduler>" in text and "tsl-XXXXXX" in text
