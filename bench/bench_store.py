"""The result store's overhead: TokSearch's example with ``store=PATH`` against ``store=None``.

Side by side in one run, alternated (store, none, store, none, ...), each store
run into a fresh directory so it writes every partition and the manifest, and
syncs them to disk (``compute_*`` returns after the last sync), as a job's run would. Ray and Spark are started once and warmed up, so
their start-up is excluded. Prints a markdown table: median and min wall time of
each variant and the ratio store / none: the median of the ratios of each
back-to-back pair (drift of the machine's load cancels out) and the ratio of the
minima (goal: <= 1.05), and the mean of the pairs' ratios with its standard error (this
machine's run-to-run noise is 10-15%, so a 5% goal needs 20-30 pairs to be told from
noise); the driver process's CPU time ratio (all its threads); and the share of
the run's wall time the driver spent inside store calls (the store's cost on the
critical path; robust against the machine's load, which moves wall times by more
than 5% on a shared 2-core machine).

    .venv/bin/python bench/bench_store.py [--records 10000] [--repeat 7] [--backends serial,multiprocessing,ray,spark]
        [--source synthetic|file] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from toksearch_example import create_pipeline  # noqa: E402  (TokSearch's own pipeline)


def make_signal(source: str, records: int, first_shot: int, work: Path) -> Any:
    if source == "synthetic":
        from toksearch_launch import SyntheticSignal

        return SyntheticSignal("ipmhd")
    from toksearch_launch import FileSignal
    from toksearch_launch.signals.local import ensure_demo_archive

    return FileSignal("ipmhd", ensure_demo_archive(str(work / "demo.h5"), first_shot, records, ["ipmhd"]))


def runners(backends: List[str]) -> Dict[str, Callable[..., Any]]:
    """compute_<backend>(store=...) with the backend started once beforehand."""
    out: Dict[str, Callable[..., Any]] = {}
    for name in backends:
        if name == "serial":
            out[name] = lambda p, store: p.compute_serial(store=store)
        elif name == "multiprocessing":
            out[name] = lambda p, store: p.compute_multiprocessing(num_workers=2, store=store)
        elif name == "ray":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
            out[name] = lambda p, store: p.compute_ray(store=store, verbose=False)
        elif name == "spark":
            from toksearch_launch.pipeline.spark_backend import local_session

            session = local_session(2)
            out[name] = lambda p, store, s=session: p.compute_spark(sc=s, store=store, verbose=False)
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return out


_in_store = [0.0]


def time_store_calls() -> None:
    """Count the seconds the driver spends inside the store (open, add, flush, manifest): the
    store's cost on the critical path, which the machine's load barely moves. Not in it: the
    group sync's thread taking the GIL back after each of its system calls."""
    from toksearch_launch.pipeline import store as store_module

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _in_store[0] += time.perf_counter() - start
        return wrapper

    cls = store_module.ResultStore
    cls.add = timed(cls.add)  # pickles (unless a worker did) and writes the partition file
    cls.flush = timed(cls.flush)  # waits for the group sync (also called by write_manifest)
    cls.open = classmethod(timed(cls.open.__func__))
    store_module.write_atomic_replace = timed(store_module.write_atomic_replace)  # the manifest itself


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--backends", default="serial,multiprocessing,ray,spark")
    parser.add_argument("--source", choices=("synthetic", "file"), default="synthetic")
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temp dir)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_store-"))
    work.mkdir(parents=True, exist_ok=True)
    first_shot = 165920
    shots = list(range(first_shot, first_shot + args.records))
    signal = make_signal(args.source, args.records, first_shot, work)
    run = runners(args.backends.split(","))
    time_store_calls()

    rows = []
    for name, compute in run.items():
        compute(create_pipeline(shots, signal), None)  # warm-up (workers, imports, JIT of the JVM)
        times: Dict[str, List[float]] = {"none": [], "store": []}
        cpu: Dict[str, List[float]] = {"none": [], "store": []}
        inside: List[float] = []
        for k in range(args.repeat):
            for variant in ("store", "none") if k % 2 == 0 else ("none", "store"):
                target = work / f"{name}-{k}" if variant == "store" else None
                pipeline = create_pipeline(shots, signal)
                with contextlib.redirect_stdout(io.StringIO()):
                    _in_store[0] = 0.0
                    start, cpu_start = time.perf_counter(), time.process_time()
                    result = compute(pipeline, target)
                    times[variant].append(time.perf_counter() - start)
                    cpu[variant].append(time.process_time() - cpu_start)
                    if variant == "store":
                        inside.append(_in_store[0] / times[variant][-1])
                assert len(result) == args.records, (name, variant, len(result))
                if target is not None:
                    shutil.rmtree(target)
        med = {v: statistics.median(t) for v, t in times.items()}
        pairs = [s / n for s, n in zip(times["store"], times["none"])]
        spread = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")
        rows.append((name, med["none"], min(times["none"]), med["store"], min(times["store"]),
                     statistics.median(pairs), statistics.mean(pairs), spread, min(times["store"]) / min(times["none"]),
                     statistics.median(cpu["store"]) / statistics.median(cpu["none"]), statistics.median(inside)))

    print(f"# store overhead, {args.records} records, source={args.source}, {args.repeat} runs each, alternated")
    print(f"# {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"stores in {work}")
    print("| backend | store=None median (s) | min (s) | store=PATH median (s) | min (s) | wall ratio (median of pairs) "
          "| wall ratio (mean of pairs +- its standard error) | wall ratio (min) | driver CPU ratio (median) "
          "| time in the store / run time (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_med, n_min, s_med, s_min, r_med, r_mean, r_se, r_min, r_cpu, share in rows:
        print(f"| {name} | {n_med:.3f} | {n_min:.3f} | {s_med:.3f} | {s_min:.3f} | {r_med:.3f}x | {r_mean:.3f}x +- {r_se:.3f} "
              f"| {r_min:.3f}x | {r_cpu:.3f}x | **{100 * share:.1f}%** |")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
