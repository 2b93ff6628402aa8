"""The durability pipeline with a mark per record start, for the node-loss tests.

    python tests/node_loss_job.py BACKEND COUNT LATENCY NUMPARTS MARKS_DIR

Before anything else, each record leaves an empty file ``MARKS_DIR/<shot>.<host>.<pid>.<ns>``
as its partition starts it, so a test can count, without the engine's word, which
partitions were started more than once. The mark changes no record: the results
equal ``durability_job.make_pipeline(COUNT, 0).compute_serial()``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from durability_job import make_pipeline
from toksearch_launch import Pipeline
from toksearch_launch.pipeline.ops import Map


def mark_start(marks: str):
    def mark(rec) -> None:
        name = f"{rec.shot}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"
        os.close(os.open(os.path.join(marks, name), os.O_CREAT | os.O_WRONLY, 0o644))

    return mark


def marked_pipeline(count: int, latency: float, marks: str) -> Pipeline:
    pipeline = Pipeline(make_pipeline(count, latency))
    pipeline._ops.insert(0, Map(mark_start(marks)))  # first: a record is marked as soon as its partition reaches it
    return pipeline


def main(argv) -> int:
    backend, count, latency, numparts, marks = argv[0], int(argv[1]), float(argv[2]), int(argv[3]), argv[4]
    print(f"PID {os.getpid()} on {socket.gethostname()}", flush=True)  # the cluster's owner: its daemons carry this PID
    result = getattr(marked_pipeline(count, latency, marks), f"compute_{backend}")(numparts=numparts)
    print(f"RESULT {len(result)} computed={result.info.get('records_computed')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
