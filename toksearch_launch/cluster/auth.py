"""Per-job secrets and the environment names through which daemons and step wrappers get them."""

from __future__ import annotations

import secrets
from typing import Callable, Optional

#: Env var the daemons carry so that code running inside them (a Ray task, a Spark
#: executor, a Dask worker) never starts a cluster of its own from `job_cluster()`.
DAEMON_ENV = "TOKSEARCH_CLUSTER_DAEMON"
#: SLURM: env vars through which the step wrapper gets a secret it must write to a
#: 0600 file on its node (removed from the daemon's environment).
SECRET_VALUE_ENV = "_TOKSEARCH_SECRET"
SECRET_FILE_ENV = "_TOKSEARCH_SECRET_FILE"

_SECRETS: dict[str, str] = {}


def random_token() -> str:
    return secrets.token_hex(32)


def job_secret(kind: str, make: Optional[Callable[[], str]] = None) -> str:
    """A fresh secret per process (= per job), one per kind ("ray", "spark", "dask").

    Per process rather than per cluster because Ray caches its token and a pyspark
    driver JVM reads its secret once at launch: clusters of one process share it.
    ``make`` builds a new one (default: 64 random hex digits).
    """
    if kind not in _SECRETS:
        _SECRETS[kind] = (make or random_token)()
    return _SECRETS[kind]
