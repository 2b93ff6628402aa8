"""In-job Ray, Spark and Dask clusters across a toksearch job's nodes.

One lifecycle for every backend (plan, start head, start workers in parallel,
wait until ready, run, stop), used three ways:

* lazily, by ``Pipeline.compute_ray()`` / ``compute_spark()`` / ``compute_dask()``
  through :func:`job_cluster` (started on first use, stopped at exit or SIGTERM);
* eagerly, by ``python -m toksearch_launch.cluster.eager --backend NAME -- COMMAND``
  (``backend.start=eager``): started before COMMAND, which gets the address and
  the auth settings in its environment;
* in the background, by the same wrapper with ``--start background``
  (``backend.start=background``): started while COMMAND already runs, whose
  :func:`job_cluster` waits for what remains of the start (:mod:`.background`);
* as a context manager in scripts: ``with Cluster("ray") as c: c.connect()``.

Layout: :mod:`.backend` (the Backend protocol and registry; one module per
engine: :mod:`.ray`, :mod:`.spark`, :mod:`.dask`), :mod:`.launcher` (the step
Launcher protocol: local processes or SLURM steps, with the step wrapper
:mod:`.node`), :mod:`.plan` (ClusterPlan, the dry run), :mod:`.preflight`,
:mod:`.hooks` (exit / signal hooks, :func:`job_cluster`), :mod:`.lifecycle`
(:class:`Cluster`, which only orchestrates).

Importing this package never imports ray, pyspark or dask (the CLI must stay fast).
"""

from __future__ import annotations

from .backend import backend_names, get_backend
from .errors import ClusterError, StartError
from .hooks import job_cluster, stop_all
from .lifecycle import Cluster
from .plan import plan_commands
from .site import default_local_config

__all__ = [
    "Cluster",
    "ClusterError",
    "StartError",
    "backend_names",
    "default_local_config",
    "get_backend",
    "job_cluster",
    "plan_commands",
    "stop_all",
]
