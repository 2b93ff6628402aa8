"""Unit tests of resources from the allocation: the pure env -> options functions, the
planner's flags (an explicit option wins) and the step wrapper's substitution on its node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toksearch_launch.cluster import launcher, plan as planmod, plan_commands
from toksearch_launch.cluster import resources as res
from toksearch_launch.config import as_typed

REPO = Path(__file__).resolve().parents[1]
GB = 10 ** 9
MB = 1 << 20


def site_cfg(profile: str, **over):
    return as_typed(OmegaConf.merge(OmegaConf.load(REPO / "conf" / "site" / f"{profile}.yaml"), over))


# ------------------------------------------------------------------ env -> values


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_CPUS_ON_NODE": "6"}, 6),  # the step's own count on this node wins
    ({"SLURM_CPUS_ON_NODE": "6", "SLURM_JOB_CPUS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "n[1-3]",
      "SLURMD_NODENAME": "n2"}, 6),
    ({"SLURM_JOB_CPUS_PER_NODE": "4,2(x2)", "SLURM_JOB_NODELIST": "n[1-3]", "SLURMD_NODENAME": "n1"}, 4),
    ({"SLURM_JOB_CPUS_PER_NODE": "4,2(x2)", "SLURM_JOB_NODELIST": "n[1-3]", "SLURMD_NODENAME": "n3"}, 2),
    ({"SLURM_CPUS_ON_NODE": "junk"}, 7),  # unreadable: the fallback (CPU affinity)
    ({}, 7),
])
def test_cpus_on_node(env, expected):
    assert res.cpus_on_node(env, fallback=7) == expected


def test_memory_on_node_per_node_per_cpu_or_the_node():
    ram = 64 * 1024 * MB
    assert res.memory_on_node({"SLURM_MEM_PER_NODE": "8000"}, cpus=4, fallback=ram) == 8000 * MB
    assert res.memory_on_node({"SLURM_MEM_PER_CPU": "1500"}, cpus=4, fallback=ram) == 6000 * MB
    # both set: per node (Slurm sets only one; per node is what the node has in all)
    assert res.memory_on_node({"SLURM_MEM_PER_NODE": "8000", "SLURM_MEM_PER_CPU": "1"}, 4, ram) == 8000 * MB
    assert res.memory_on_node({}, cpus=4, fallback=ram) == ram  # Slurm tracks no memory: the node's RAM
    assert res.memory_on_node({"SLURM_MEM_PER_NODE": "0"}, cpus=4, fallback=ram) == ram
    assert res.memory_on_node({"SLURM_MEM_PER_NODE": "999999999"}, 4, fallback=ram) == ram  # never above RAM
    assert res.allocated_memory({}, 4) is None


@pytest.mark.parametrize("env,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "4"}, 2),  # what the daemon will see
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),  # Slurm's value for a step without GPUs
    ({"SLURM_GPUS_ON_NODE": "3"}, 3),
    ({}, 0),  # no GPU allocated: Ray must not take the node's GPUs
])
def test_gpus_on_node(env, expected):
    assert res.gpus_on_node(env) == expected


def test_object_store_is_ray_share_bounded_by_shm():
    assert res.object_store_bytes(10 * GB, shm_free=None) == 3 * GB
    assert res.object_store_bytes(10 * GB, shm_free=2 * GB) == int(1.8 * GB)  # 90% of the free /dev/shm
    assert res.object_store_bytes(10 * GB, shm_free=100 * GB) == 3 * GB
    assert res.object_store_bytes(100, shm_free=100) == res.OBJECT_STORE_MIN


def test_node_values_add_up_to_the_allocation():
    env = {"SLURM_CPUS_ON_NODE": "3", "SLURM_MEM_PER_CPU": "2048", "CUDA_VISIBLE_DEVICES": "0"}
    v = res.node_values(env, fallback_cpus=1, ram=1 << 40, shm_free=1 << 40)
    memory = 3 * 2048 * MB
    assert v[res.NODE_CPUS] == "3" and v[res.NODE_GPUS] == "1"
    assert int(v[res.NODE_OBJECT_STORE]) + int(v[res.NODE_RAY_MEMORY]) == memory  # heap + store = allocation
    assert int(v[res.NODE_OBJECT_STORE]) == int(memory * 0.3)
    assert v[res.NODE_SPARK_MEMORY] == f"{3 * 2048 - 1024}m"  # 1 GiB left to the worker JVM itself


def test_fill_node_values_replaces_placeholders_only():
    values = {res.NODE_CPUS: "4", res.NODE_SPARK_MEMORY: "3072m"}
    assert res.fill_node_values(["-c", "@NODE_CPUS@", "-m", "@NODE_SPARK_MEMORY@", "x@NODE_IP@"], values) == \
        ["-c", "4", "-m", "3072m", "x@NODE_IP@"]


# ------------------------------------------------------------------ the planner's flags


def test_ray_flags_skip_what_the_user_set():
    assert res.ray_allocation_flags([], str) == [
        "--num-cpus", "@NODE_CPUS@", "--num-gpus", "@NODE_GPUS@", "--memory", "@NODE_RAY_MEMORY@",
        "--object-store-memory", "@NODE_OBJECT_STORE@"]
    assert res.ray_allocation_flags(["--num-cpus=8", "--memory", "1000", "--num-gpus=0"], str) == [
        "--object-store-memory", "@NODE_OBJECT_STORE@"]


def test_spark_flags_skip_what_the_user_set():
    assert res.spark_allocation_flags([], str) == ["-c", "@NODE_CPUS@", "-m", "@NODE_SPARK_MEMORY@"]
    assert res.spark_allocation_flags(["--cores", "2"], str) == ["-m", "@NODE_SPARK_MEMORY@"]
    assert res.spark_allocation_flags(["-c", "1", "-m", "1G"], str) == []


def _slurm_plan(backend, cfg, hosts, tmp_path, monkeypatch):
    monkeypatch.setattr(planmod, "job_secret", lambda kind, make=None: "S3CRET-" + kind)
    monkeypatch.setenv("SLURMD_NODENAME", hosts[0])
    return planmod.make_plan(backend, cfg, hosts, tmp_path)


def _tail(argv):
    return argv[argv.index("--") + 1:]


def test_slurm_ray_commands_take_the_allocation_unless_set(tmp_path, monkeypatch):
    cfg = site_cfg("default", nodes=2, site={"address": {"method": "interface", "interface": "lo"}},
                   ray={"worker": {"start": ["--num-cpus=8"]}})
    plan = _slurm_plan("ray", cfg, ["n1", "n2"], tmp_path, monkeypatch)
    try:
        head, worker = (_tail(d.argv) for d in launcher.daemons_of(plan))
        assert head[head.index("--num-cpus") + 1] == "@NODE_CPUS@"
        assert head[head.index("--object-store-memory") + 1] == "@NODE_OBJECT_STORE@"
        assert "--num-cpus" not in worker and worker[-2:] == ["--num-cpus=8", "--block"]  # explicit wins
        assert worker[worker.index("--memory") + 1] == "@NODE_RAY_MEMORY@"
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


def test_local_keeps_its_own_shares(tmp_path):
    cfg = site_cfg("local", nodes=2, site={"local_cpus_per_node": 1})
    ray = plan_commands("ray", cfg, ["local1", "local2"])
    spark = plan_commands("spark", cfg, ["local1", "local2"])
    assert all("@NODE_" not in " ".join(c) and "<cpus:" not in " ".join(c) for c in ray + spark)
    assert ray[1][ray[1].index("--num-cpus") + 1] == "1"
    assert spark[1][-4:-1] == ["1", "-m", "2G"]  # -c share, then local.yaml's -m 2G


def test_dry_run_shows_per_node_placeholders():
    cfg = site_cfg("saga", nodes=2)
    ray = plan_commands("ray", cfg, ["node1", "node2"])
    spark = plan_commands("spark", cfg, ["node1", "node2"])
    # [head step, head, worker step, node2's worker (, ...)]: what node2's wrapper runs
    assert ray[3][ray[3].index("--num-gpus") + 1] == "<gpus:node2>"
    assert spark[4][-5:-1] == ["-c", "<cpus:node2>", "-m", "<memory:node2>"]


def test_dask_memory_limit_per_process_from_the_allocation(tmp_path, monkeypatch):
    from toksearch_launch.cluster import dask as daskb

    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "4,2")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1000")
    cfg = site_cfg("default", nodes=2, site={"address": {"method": "interface", "interface": "lo"}})
    plan = _slurm_plan("dask", cfg, ["n1", "n2"], tmp_path, monkeypatch)
    try:
        argv = daskb.worker_argv(plan, 1)
        assert argv[argv.index("--count") + 1] == "2"
        assert argv[argv.index("--memory-limit") + 1] == str(1000 * MB)  # 2 x 1000 MB over 2 processes
    finally:
        from toksearch_launch.cluster.ports import release_block

        release_block(plan.ports.base)


# ------------------------------------------------------------------ the step wrapper


def test_node_wrapper_fills_in_this_nodes_allocation(tmp_path):
    """The real wrapper with a SLURM-like environment: the daemon's argv gets the node's values."""
    root = tmp_path / "tsl-res"
    env = dict(os.environ, SLURM_CPUS_ON_NODE="3", SLURM_MEM_PER_NODE="4096", CUDA_VISIBLE_DEVICES="0,1")
    out = subprocess.run(
        [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", str(root), "--dir", str(root / "r1"),
         "--ip", "127.0.0.9", "--", sys.executable, "-c", "import sys; print('ARGV', *sys.argv[1:])",
         "--num-cpus", "@NODE_CPUS@", "--num-gpus", "@NODE_GPUS@", "-m", "@NODE_SPARK_MEMORY@",
         "--object-store-memory", "@NODE_OBJECT_STORE@", "--memory", "@NODE_RAY_MEMORY@"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ARGV"))
    got = line.split()[1:]
    assert got[:6] == ["--num-cpus", "3", "--num-gpus", "2", "-m", "3072m"]
    store, heap = int(got[7]), int(got[9])
    assert store + heap == 4096 * MB and store <= int(4096 * MB * 0.3)
    assert "from the allocation on" in out.stdout and "--num-cpus 3" in out.stdout


# ------------------------------------------------------------------ the dry run's plain config


@pytest.mark.parametrize("profile,backend", [("saga", "ray"), ("saga", "spark"), ("default", "dask"),
                                             ("local", "ray"), ("local", "spark")])
def test_dry_run_on_the_plain_config_equals_the_omegaconf_plan(tmp_path, profile, backend):
    """plan_commands reads a plain copy of the config (fast at 1,000 nodes): same commands."""
    from toksearch_launch.procutil import redact

    cfg = site_cfg(profile, nodes=3, ray={"worker": {"start": ["--num-cpus=8"]}})
    hosts = ["node1", "node2", "node3"]
    direct = planmod.make_plan(backend, cfg, hosts, Path(cfg.site.tmp_base) / "run", dry_run=True)
    assert plan_commands(backend, cfg, hosts) == [redact(argv) for argv in launcher.commands_of(direct)]
    plain = planmod.plain_config(cfg)
    assert plain.site.address.method == cfg.site.address.method and plain["ray"].worker.start == ["--num-cpus=8"]
    with pytest.raises(AttributeError):
        plain.site.no_such_key


# ------------------------------------------------------------------ pre-flight on each node


def test_node_problems_name_the_node():
    assert res.node_problems(["ray", "--object-store-memory", "5000"], shm_total=10 ** 4, host="n2") == []
    (msg,) = res.node_problems(["ray", "--object-store-memory=9e15"], shm_total=10 ** 9, host="n2")
    assert "larger than /dev/shm on n2" in msg and "9000000.0 GB" in msg
    assert res.node_problems(["spark-class", "-m", "2G"], shm_total=10 ** 9, host="n2") == []


def test_node_wrapper_refuses_an_object_store_its_shm_cannot_hold(tmp_path):
    root = tmp_path / "tsl-shm"
    out = subprocess.run(
        [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", str(root), "--dir", str(root / "r1"),
         "--ip", "127.0.0.9", "--", sys.executable, "-c", "print('STARTED')", "--object-store-memory=9e15"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "STARTED" not in out.stdout and not root.exists()  # nothing started, nothing made
    assert "toksearch-node: ERROR on " in out.stdout and "larger than /dev/shm" in out.stdout
