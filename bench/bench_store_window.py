"""The SIGKILL window of the result store: how long a finished partition takes to be on disk.

A finished partition survives a SIGKILL of the script once ``ResultStore.add`` has
written it under its name, on the driver's thread (its records come pickled by the
worker, or are pickled in ``add``, which this window includes); a SIGKILL in between
loses it (docs/durability.md, "What can still be lost"). This measures, for
every partition of TokSearch's example (``create_pipeline`` of examples/toksearch_example.py),
the time from the call of ``ResultStore.add`` to the end of its ``write_atomic``
(under its name; its sync to disk, for a machine crash, follows in groups), and prints the median, 95th percentile
and maximum per backend, with how many partitions were waiting at once at most.

    .venv/bin/python bench/bench_store_window.py [--records 10000] [--backends serial,multiprocessing,ray] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

from bench_store import make_signal, runners  # noqa: E402
from toksearch_example import create_pipeline  # noqa: E402

_handed: Dict[str, float] = {}
_windows: List[float] = []
_waiting = [0, 0]  # now, most at once


def watch_the_writer() -> None:
    """Time each partition from ``add`` to the end of its atomic write (patched, not changed)."""
    from toksearch_launch.pipeline import store as store_module

    cls = store_module.ResultStore
    add, write_atomic = cls.add, store_module.write_atomic

    def timed_add(self, positions, shots, *rest):
        if positions:
            _handed[store_module.part_name(positions, shots)] = time.perf_counter()
            _waiting[0] += 1
            _waiting[1] = max(_waiting[1], _waiting[0])
        return add(self, positions, shots, *rest)

    def timed_write(path, data, **kwargs):
        write_atomic(path, data, **kwargs)
        start = _handed.pop(Path(path).name, None)
        if start is not None:
            _windows.append(time.perf_counter() - start)
            _waiting[0] -= 1

    cls.add = timed_add
    store_module.write_atomic = timed_write  # add looks it up at each call


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--backends", default="serial,multiprocessing,ray")
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temp dir)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_window-"))
    first_shot = 165920
    shots = list(range(first_shot, first_shot + args.records))
    signal = make_signal("synthetic", args.records, first_shot, work)
    run = runners(args.backends.split(","))
    watch_the_writer()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, Python {platform.python_version()}, "
          f"{args.records} records, store in {work}")
    print("| backend | partitions | add called -> on disk: median (ms) | p95 (ms) | max (ms) | most waiting at once |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, compute in run.items():
        compute(create_pipeline(shots, signal), None)  # warm-up
        _windows.clear()
        _waiting[:] = [0, 0]
        target = work / name
        with contextlib.redirect_stdout(io.StringIO()):
            compute(create_pipeline(shots, signal), target)
        shutil.rmtree(target)
        ordered = sorted(_windows)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"| {name} | {len(ordered)} | {statistics.median(ordered) * 1e3:.1f} | {p95 * 1e3:.1f} | "
              f"{ordered[-1] * 1e3:.1f} | {_waiting[1]} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
