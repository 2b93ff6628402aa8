"""The pipeline of the durability tests, and a job script that runs it.

    python tests/durability_job.py BACKEND COUNT LATENCY
    python tests/durability_job.py two COUNT LATENCY HOLD_FILE

COUNT shots of a synthetic signal, each shot first sleeping LATENCY seconds (so a
run takes a known time; ``DURABILITY_JOB_LATENCY`` in the environment, when set, wins:
a test's resume runs faster. The pause is a step whose length is a global, so it is
not part of the pipeline's fingerprint and a resume at another pace is the same run), a map with an array and a scalar, a where() that drops
some shots, a signal missing for some (records with errors). Prints
``RESULT <records> computed=<n>`` when done. ``two``: two serial computes (this
pipeline, then :func:`second_pipeline`); between them it prints ``BETWEEN`` and
waits while HOLD_FILE exists, so that a test can kill it there.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from toksearch_launch import Pipeline, SyntheticSignal

FIRST_SHOT = 170000
PAUSE = {"s": 0.0}  # seconds per shot; a global (not a closure value), so outside the fingerprint


def paced(pipeline: Pipeline, latency: float) -> Pipeline:
    """Every shot sleeps first: the run's pace, set for this process and not fingerprinted."""
    PAUSE["s"] = float(os.environ.get("DURABILITY_JOB_LATENCY", latency))

    @pipeline.map
    def pause(rec):  # nested: pickled by value (with PAUSE) for workers that cannot import this file
        if PAUSE["s"] > 0:
            time.sleep(PAUSE["s"])

    return pipeline


def make_pipeline(count: int, latency: float) -> Pipeline:
    pipeline = paced(Pipeline(range(FIRST_SHOT, FIRST_SHOT + count)), latency)
    pipeline.fetch("ip", SyntheticSignal("ip", n=64, missing_every=13))

    @pipeline.map
    def summarize(rec):
        data = rec["ip"]["data"]
        rec["max_ip"] = float(np.max(np.abs(data)))
        rec["ip_head"] = np.asarray(data[:8], dtype=np.float32)

    @pipeline.where
    def not_every_seventh(rec):
        return rec.shot % 7 != 0

    pipeline.discard(["ip"])
    return pipeline


def second_pipeline(count: int, latency: float) -> Pipeline:
    """Another pipeline over the shots after the first one's: a script's second compute."""
    pipeline = paced(Pipeline(range(FIRST_SHOT + count, FIRST_SHOT + 2 * count)), latency)
    pipeline.fetch("ip", SyntheticSignal("ip", n=16, missing_every=11))

    @pipeline.map
    def mean_ip(rec):
        rec["mean_ip"] = float(np.mean(rec["ip"]["data"]))

    pipeline.discard(["ip"])
    return pipeline


def two_computes(count: int, latency: float, hold: str) -> int:
    first = make_pipeline(count, latency).compute_serial()
    print(f"BETWEEN first={len(first)}", flush=True)
    deadline = time.monotonic() + 300
    while os.path.exists(hold) and time.monotonic() < deadline:  # the test kills us here
        time.sleep(0.05)
    second = second_pipeline(count, latency).compute_serial()
    print(f"RESULT {len(first)}+{len(second)} computed={second.info.get('records_computed')}", flush=True)
    return 0


def main(argv) -> int:
    backend, count, latency = argv[0], int(argv[1]), float(argv[2])
    print(f"PID {os.getpid()}", flush=True)  # the SIGKILL test kills exactly this process
    if backend == "two":
        return two_computes(count, latency, argv[3])
    pipeline = make_pipeline(count, latency)
    kwargs = {"numparts": int(argv[3])} if len(argv) > 3 and backend in ("ray", "spark") else {}
    if backend == "multiprocessing":
        kwargs = {"num_workers": 2, "batch_size": int(argv[3]) if len(argv) > 3 else "auto"}
    result = getattr(pipeline, f"compute_{backend}")(**kwargs)
    print(f"RESULT {len(result)} computed={result.info.get('records_computed')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def same_value(a, b) -> bool:
    """Equal values, arrays by dtype, shape and content (NaN equal to NaN), dicts recursively."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if hasattr(a, "identical"):  # xarray
        return bool(a.identical(b))
    return type(a) is type(b) and a == b


def assert_same_records(got, want) -> None:
    """Record by record, field by field, in order: what the durability tests must show."""
    got_shots = [r["shot"] for r in got]
    want_shots = [r["shot"] for r in want]
    assert len(got_shots) == len(set(got_shots)), "duplicated records"
    assert got_shots == want_shots, f"lost: {sorted(set(want_shots) - set(got_shots))[:10]}, extra: {sorted(set(got_shots) - set(want_shots))[:10]}"
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g["shot"], sorted(g), sorted(w))
        for key in w:
            if key == "errors":  # tracebacks name files as each process loaded them: compare what failed and why
                g_err, w_err = (({k: {f: v[f] for f in ("label", "type", "message")} for k, v in r[key].items()})
                                for r in (g, w))
                assert g_err == w_err, (g["shot"], g_err, w_err)
                continue
            assert same_value(g[key], w[key]), (g["shot"], key, g[key], w[key])
