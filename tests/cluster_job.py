"""A job for the SLURM tests: start the job's cluster, say where it is, then wait to be cancelled.

    python tests/cluster_job.py ray|spark [seconds]
Prints `READY <temp dir> <node addresses>` once every node has registered.
"""

import sys
import time

from toksearch_launch.cluster import job_cluster

backend = sys.argv[1]
cluster = job_cluster(backend)
print("READY", cluster.plan.root, ",".join(cluster.node_addresses), flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 600)
