"""A small Dask job for the fault tests: its cluster's ports per node, and a result compared with compute_serial.

    python tests/ports_job.py [seconds to sleep before computing]
Prints ``PORTS {"hosts": [...], "ports": [...], "pid": N, "job": ID, "root": TEMP_DIR}`` once the cluster is ready,
then ``SAME <n>`` (or ``DIFFERENT ...``) after comparing compute_dask with compute_serial.
"""

import json
import os
import sys
import time

from toksearch_launch import Pipeline
from toksearch_launch.cluster import job_cluster


def squares() -> Pipeline:
    p = Pipeline(range(1, 41))

    @p.map
    def square(rec):
        rec["sq"] = rec["shot"] ** 2

    p.keep(["sq"])
    return p


cluster = job_cluster("dask")
print("PORTS " + json.dumps({"hosts": list(cluster.plan.hosts), "ports": cluster.plan.ports.all_ports(),
                             "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"), "root": cluster.plan.root}),
      flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
got = [(r["shot"], r["sq"]) for r in squares().compute_dask(verbose=False)]
want = [(r["shot"], r["sq"]) for r in squares().compute_serial(verbose=False)]
print(f"SAME {len(got)}" if got == want and len(got) == 40 else f"DIFFERENT {got} {want}", flush=True)
