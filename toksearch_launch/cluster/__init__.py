"""In-job Ray and Spark clusters across a toksearch job's nodes.

One lifecycle for both backends (plan, start head, start workers in parallel,
wait until ready, run, stop), used three ways:

* lazily, by ``Pipeline.compute_ray()`` / ``compute_spark()`` through
  :func:`job_cluster` (started on first use, stopped at exit or SIGTERM);
* eagerly, by ``python -m toksearch_launch.cluster.eager --backend NAME -- COMMAND``
  (``backend.start=eager``): started before COMMAND, which gets ``RAY_ADDRESS`` /
  ``SPARK_MASTER_URL`` and the auth settings in its environment;
* as a context manager in scripts: ``with Cluster("ray") as c: c.connect()``.

Importing this package never imports ray or pyspark (the CLI must stay fast).
"""

from __future__ import annotations

from .errors import ClusterError, StartError
from .lifecycle import Cluster, default_local_config, job_cluster, plan_commands, stop_all

__all__ = [
    "Cluster",
    "ClusterError",
    "StartError",
    "default_local_config",
    "job_cluster",
    "plan_commands",
    "stop_all",
]
