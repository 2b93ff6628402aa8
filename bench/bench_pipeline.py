"""Pipeline throughput: toksearch_launch's backends against hand-written Ray / PySpark.

Sections (each prints a markdown table):

1. Ray (a local ``ray.init(num_cpus=2)``): ``compute_ray()`` vs a hand-written Ray
   program doing the same work with the same batching (same partitions: a
   ``@ray.remote`` function over the same shot chunks building the same dicts),
   alternated ``--ray-repeat`` times, 3 runs each, with the CPU per run of the driver
   and every Ray process (load-proof, unlike wall time); optionally vs one record per
   partition (TokSearch's default). Goal: >= 0.9x the hand-written program. On the trivial
   map a third contender, the same hand-written program with Records (built in the task,
   sent as plain dicts, rebuilt on the driver), shows how near any Record-based code can come.
2. Spark: the same with ``compute_spark()`` and PySpark.
3. ``compute_multiprocessing()`` vs ``compute_serial()``.
4. Synthetic signal with 5 ms latency per fetch: throughput against node count on
   site=local clusters started with ``toksearch_launch.cluster.Cluster("ray", cfg)``
   (skipped with a note if that module is not available yet).

Each measured run covers building the pipeline from the shot list, computing and
getting the kept fields back in order; Ray/Spark are started once per section and
warmed up first, so startup is excluded (it is reported separately). Numbers are
the best of ``--repeat`` runs, with the median; alternated so load hits both alike.

    .venv/bin/python bench/bench_pipeline.py [--records 10000] [--repeat 3] [--skip ray,spark,mp,nodes]

The Ray section alone (issue 12.6; about 3 minutes on a quiet machine, most of it the example's
work; ``--ray-workloads trivial`` for the trivial map alone, about 30 s):

    .venv/bin/python bench/bench_pipeline.py --skip spark,mp,nodes --scaling-backends "" --ray-repeat 6
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from toksearch_launch import Pipeline
from toksearch_launch.pipeline.driver import default_numparts, split_evenly
from toksearch_launch.signals import SyntheticSignal

# --------------------------------------------------------------------------- workloads


def trivial(rec) -> None:
    """The trivial map of the brief."""
    rec["y"] = rec["shot"] * 2


def trivial_pipeline(shots: Sequence[int]) -> Pipeline:
    p = Pipeline(shots)
    p.map(trivial)
    return p


def hand_trivial(shots: Sequence[int]) -> List[dict]:
    """The same work written by hand: a dict per shot, the same map function, dicts back."""
    out = []
    for s in shots:
        rec = {"shot": s, "errors": {}}
        trivial(rec)
        out.append(rec)
    return out


def hand_trivial_records(shots: Sequence[int]) -> List[dict]:
    """The least any Record-based program does with Ray's msgpack wire: a Record per shot
    (built the cheapest way measured), the same map on it, and a plain dict per record to send
    (the driver rebuilds the Records, in ``bench_ray``'s ``floor``). Its ratio to the hand-written dicts is
    the ceiling for ``compute_ray()`` with TokSearch-compatible Records (issue 12, item 6)."""
    from toksearch_launch.pipeline.record import Record

    new, update = dict.__new__, dict.update
    out = []
    for s in shots:
        rec = new(Record)
        update(rec, shot=s, errors={})
        trivial(rec)
        out.append(rec)
    return list(map(dict, out))


#: workload -> its Record-based hand-written task, where one is measured
RECORD_FLOOR = {"trivial": hand_trivial_records}


IPMHD = SyntheticSignal("ipmhd")


def calc_max_ipmhd(rec) -> None:
    rec["max_ipmhd"] = np.max(np.abs(rec["ipmhd"]["data"]))


def example_pipeline(shots: Sequence[int]) -> Pipeline:
    """The TokSearch example on the synthetic signal (about 40 us of work per record)."""
    p = Pipeline(shots)
    p.fetch("ipmhd", IPMHD)
    p.map(calc_max_ipmhd)
    p.keep(["max_ipmhd"])
    return p


def hand_example(shots: Sequence[int]) -> List[dict]:
    """The example written by hand: fetch, the same map, keep one field."""
    out = []
    for s in shots:
        rec = {"shot": s, "errors": {}, "ipmhd": IPMHD.gather(s)}
        calc_max_ipmhd(rec)
        out.append({"shot": s, "errors": rec["errors"], "max_ipmhd": rec["max_ipmhd"]})
    return out


#: name -> (label, pipeline builder, hand-written equivalent working on a list of shots)
WORKLOADS = {
    "trivial": ("trivial map", trivial_pipeline, hand_trivial),
    "example": ("example: fetch synthetic ipmhd + max", example_pipeline, hand_example),
}


def latency_pipeline(shots: Sequence[int], latency: float) -> Pipeline:
    """The TokSearch example with a server-like signal: ``latency`` s per fetch."""
    p = Pipeline(shots)
    p.fetch("ipmhd", SyntheticSignal("ipmhd", latency=latency))

    @p.map
    def calc_max_ipmhd(rec):
        rec["max_ipmhd"] = np.max(np.abs(rec["ipmhd"]["data"]))

    p.keep(["max_ipmhd"])
    return p


# --------------------------------------------------------------------------- timing helpers


def timed(fn: Callable[[], object]) -> float:
    """Seconds to run ``fn`` and read one field of every record it returns."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fn()
        total = sum(r["shot"] for r in result)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    assert total > 0
    return elapsed


def compare(runs: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, List[float]]:
    """Alternate the contenders ``repeat`` times; seconds per run for each."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return times


def table(title: str, n: int, times: Dict[str, List[float]], reference: str, notes: Dict[str, str],
          cpu: Optional[Dict[str, List[float]]] = None) -> str:
    """Best and median per contender, and the ratio of each to ``reference`` (best and median);
    with ``cpu``, the median CPU seconds per run of this process and its children."""
    ref, ref_median = min(times[reference]), statistics.median(times[reference])
    cpu_head, cpu_rule = (" median CPU ms (driver + Ray) |", "---:|") if cpu else ("", "")
    lines = [
        f"### {title}",
        "",
        f"| contender | records | runs | best s | median s | records/s (best) | vs {reference} (best) | "
        f"vs {reference} (median) |{cpu_head}",
        f"|---|---:|---:|---:|---:|---:|---:|---:|{cpu_rule}",
    ]
    for name, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        note = f" ({notes[name]})" if name in notes else ""
        cpu_cell = f" {statistics.median(cpu[name]) * 1000:.0f} |" if cpu and name in cpu else (" - |" if cpu else "")
        lines.append(
            f"| {name}{note} | {n} | {len(ts)} | {best:.3f} | {median:.3f} | {n / best:,.0f} | {ref / best:.2f}x | "
            f"{ref_median / median:.2f}x |{cpu_cell}"
        )
    return "\n".join(lines)


def cpu_seconds() -> float:
    """CPU (user + system) used so far by this process and every child (a local Ray's raylet,
    GCS and workers): a figure the machine's load does not inflate, unlike wall time."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def compare_with_cpu(runs: Dict[str, Callable[[], object]], repeat: int, per_sample: int
                     ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """:func:`compare`, plus CPU seconds per run measured over ``per_sample`` runs at a time
    (the kernel counts CPU in 10 ms ticks)."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    cpu: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            before = cpu_seconds()
            for _ in range(per_sample):
                times[name].append(timed(fn))
            cpu[name].append((cpu_seconds() - before) / per_sample)
    return times, cpu


# --------------------------------------------------------------------------- sections


def bench_ray(n: int, repeat: int, cpus: int, one_per_record: bool, workloads: Sequence[str]) -> str:
    import ray

    shots = list(range(165920, 165920 + n))
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)
    init_s = time.perf_counter() - start
    out = []
    try:
        cpus = int(ray.cluster_resources()["CPU"])
        parts = default_numparts(cpus)
        from toksearch_launch.pipeline.ops import records_from_wire

        for name in workloads:
            label, build, hand_fn = WORKLOADS[name]
            remote_hand = ray.remote(hand_fn)
            remote_floor = ray.remote(RECORD_FLOOR[name]) if name in RECORD_FLOOR else None

            def hand() -> list:
                chunks = split_evenly(shots, parts)
                return [r for part in ray.get([remote_hand.remote(c) for c in chunks]) for r in part]

            def floor() -> list:
                chunks = split_evenly(shots, parts)
                return [r for part in ray.get([remote_floor.remote(c) for c in chunks])
                        for r in records_from_wire(part)]

            def ours() -> object:
                return build(shots).compute_ray()

            def one_per_record_run() -> object:
                return build(shots).compute_ray(numparts=len(shots))

            contenders = {"compute_ray()": ours, "hand-written Ray": hand}
            if remote_floor is not None:
                contenders["hand-written Ray, Records"] = floor
            for fn in contenders.values():
                timed(fn)  # warm up workers and imports
            times, cpu = compare_with_cpu(contenders, repeat, RAY_PER_SAMPLE)
            if one_per_record:
                times.update(compare({"compute_ray(numparts=N)": one_per_record_run}, 1))
            check = build(shots).compute_ray(verbose=False)
            assert [r.shot for r in check] == shots and check.num_errors == 0
            notes = {"compute_ray()": f"{parts} partitions", "hand-written Ray": f"{parts} tasks",
                     "hand-written Ray, Records": f"{parts} tasks; the Record-based floor",
                     "compute_ray(numparts=N)": "one record per partition, TokSearch's default"}
            out.append(table(f"Ray, {label}, {cpus} CPUs (local ray.init {init_s:.1f} s, excluded)", n, times,
                             "hand-written Ray", notes, cpu)
                       + f"\n\nload average {load_average()} at the end of this workload")
            print(out[-1], "\n", flush=True)  # each workload as it is done (the example's takes minutes)
    finally:
        ray.shutdown()
    return ""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: wall times on a shared machine are read against them."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


#: Runs per CPU sample in the Ray section (CPU time is counted in 10 ms ticks).
RAY_PER_SAMPLE = 3

#: Records for Spark's one-record-per-partition run (10,000 tasks would take minutes).
SPARK_ONE_PER_RECORD = 500


def bench_spark(n: int, repeat: int) -> str:
    from toksearch_launch.pipeline.spark_backend import local_session, stop_local_session

    shots = list(range(165920, 165920 + n))
    start = time.perf_counter()
    session = local_session()
    sc = session.sparkContext
    init_s = time.perf_counter() - start
    out = []
    first_job_s = None
    try:
        cpus = sc.defaultParallelism
        parts = default_numparts(cpus)
        for label, build, hand_fn in WORKLOADS.values():

            def hand() -> list:
                return sc.parallelize(shots, parts).mapPartitions(hand_fn).collect()

            def ours() -> object:
                return build(shots).compute_spark(sc=sc)

            few = shots[:SPARK_ONE_PER_RECORD]

            def one_per_record() -> object:
                return build(few).compute_spark(sc=sc, numparts=len(few))

            first = time.perf_counter()
            timed(hand)
            first_job_s = first_job_s or time.perf_counter() - first
            timed(ours)
            times = compare({"compute_spark()": ours, "hand-written PySpark": hand}, repeat)
            slow = compare({"compute_spark(numparts=N)": one_per_record}, 1)
            # Scaled to n records (measured on fewer: about 25 ms per task here).
            times["compute_spark(numparts=N)"] = [t * n / len(few) for t in slow["compute_spark(numparts=N)"]]
            check = build(shots).compute_spark(sc=sc, verbose=False)
            assert [r.shot for r in check] == shots and check.num_errors == 0
            notes = {"compute_spark()": f"{parts} partitions", "hand-written PySpark": f"{parts} partitions",
                     "compute_spark(numparts=N)": f"one record per partition, TokSearch's default; "
                                                  f"measured on {len(few)} records, scaled"}
            out.append(table(f"Spark local[{cpus}], {label} (session {init_s:.1f} s + first job {first_job_s:.1f} s, "
                             "excluded)", n, times, "hand-written PySpark", notes))
    finally:
        stop_local_session(session, stop_gateway=True)  # a later cluster session needs a fresh driver JVM
    return "\n\n".join(out)


def bench_mp(n: int, repeat: int) -> str:
    shots = list(range(165920, 165920 + n))
    out = []
    for label, build, _ in WORKLOADS.values():
        times = compare(
            {"compute_serial()": lambda: build(shots).compute_serial(),
             "compute_multiprocessing()": lambda: build(shots).compute_multiprocessing()},
            repeat,
        )
        out.append(table(f"Multiprocessing vs serial, {label}, {os.cpu_count()} CPUs", n, times, "compute_serial()", {}))
    return "\n\n".join(out)


def bench_nodes(backend: str, node_counts: Sequence[int], n: int, latency: float, cpus_per_node: int) -> str:
    """compute_ray/compute_spark over site=local clusters of 1..N nodes; the signal sleeps ``latency`` s per fetch."""
    try:
        from toksearch_launch.cluster import Cluster, default_local_config
    except ImportError as exc:
        return f"### Node scaling\n\nskipped: toksearch_launch.cluster is not available ({exc})."

    shots = list(range(165920, 165920 + n))
    rows = [f"### {backend} on site=local clusters, synthetic signal with {latency * 1000:.0f} ms latency per fetch, "
            f"{n} records, {cpus_per_node} CPU(s) per node", "",
            "| nodes | cluster CPUs | start + connect s | compute s | records/s | speed-up vs 1 node | nodes seen |",
            "|---:|---:|---:|---:|---:|---:|---|"]
    base: Optional[float] = None
    for nodes in node_counts:
        cfg = default_local_config(nodes=nodes, site={"local_cpus_per_node": cpus_per_node})
        start = time.perf_counter()
        with Cluster(backend, cfg) as cluster, contextlib.redirect_stderr(io.StringIO()):
            cluster.connect()
            started = time.perf_counter() - start

            def run(records: Sequence[int]):
                p = latency_pipeline(records, latency)
                # The active Ray / Spark connection is used, and left to the cluster to close.
                return p.compute_ray(verbose=False) if backend == "ray" else p.compute_spark(verbose=False)

            run(shots[:50])  # warm up the workers
            t0 = time.perf_counter()
            rs = run(shots)
            elapsed = time.perf_counter() - t0
        assert len(rs) == n and rs.num_errors == 0
        rate = n / elapsed
        base = base or rate
        rows.append(f"| {nodes} | {rs.info['num_cpus']} | {started:.1f} | {elapsed:.2f} | {rate:,.0f} | "
                    f"{rate / base:.2f}x | {','.join(rs.nodes)} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ray-repeat", type=int, default=10,
                        help=f"alternations in the Ray section (each {RAY_PER_SAMPLE} runs of each contender)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local ray.init")
    parser.add_argument("--ray-workloads", default=",".join(WORKLOADS),
                        help=f"comma list of the Ray section's workloads: {','.join(WORKLOADS)}")
    parser.add_argument("--ray-one-per-record", action="store_true",
                        help="also time compute_ray(numparts=N), one task per record (about a minute)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: ray,spark,mp,nodes")
    parser.add_argument("--nodes", default="1,2,3", help="node counts for the scaling section")
    parser.add_argument("--latency", type=float, default=0.005, help="seconds per fetch in the scaling section")
    parser.add_argument("--scaling-records", type=int, default=2000)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--scaling-backends", default="ray,spark", help="backends of the scaling section")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    print(f"## bench_pipeline ({platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start)\n", flush=True)
    sections: List[Tuple[str, Callable[[], str]]] = [
        ("ray", lambda: bench_ray(args.records, args.ray_repeat, args.ray_cpus, args.ray_one_per_record,
                                  [w.strip() for w in args.ray_workloads.split(",") if w.strip()])),
        ("spark", lambda: bench_spark(args.records, args.repeat)),
        ("mp", lambda: bench_mp(args.records, args.repeat)),
    ]
    for backend in [b.strip() for b in args.scaling_backends.split(",") if b.strip()]:
        sections.append(("nodes", functools.partial(
            bench_nodes, backend, [int(x) for x in args.nodes.split(",")], args.scaling_records,
            args.latency, args.cpus_per_node)))
    for name, run in sections:
        if name in skip:
            continue
        text = run()
        if text:
            print(text, "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
