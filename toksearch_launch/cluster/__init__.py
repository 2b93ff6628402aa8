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

import importlib
from typing import Any

#: public name -> the submodule that defines it, imported on first use (PEP 562), so that
#: the CLI's dry run, which needs only the planner, does not load the lifecycle, the
#: launchers and the hooks.
_EXPORTS = {
    "Cluster": ".lifecycle",
    "ClusterError": ".errors",
    "StartError": ".errors",
    "backend_names": ".backend",
    "default_local_config": ".site",
    "get_backend": ".backend",
    "job_cluster": ".hooks",
    "plan_commands": ".plan",
    "stop_all": ".hooks",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
