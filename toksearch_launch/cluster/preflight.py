"""Pre-flight: every problem found before anything starts, in one message."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from .backend import get_backend
from .dirs import check_root_length
from .errors import ClusterError

if TYPE_CHECKING:
    from .plan import ClusterPlan


def preflight(backend: str, cfg: Any, plan: Optional["ClusterPlan"] = None) -> None:
    """Raise one ClusterError listing the backend's problems and the plan's (temp dir, sizes)."""
    problems = list(get_backend(backend).preflight(cfg, plan))
    if plan is not None:
        problems += _plan_problems(plan)
    if problems:
        raise ClusterError("cannot start the %s cluster:\n  - %s" % (backend, "\n  - ".join(problems)))


def _plan_problems(plan: "ClusterPlan") -> list[str]:
    problems = []
    try:
        check_root_length(plan.root, plan.longest_node_dir())
    except ClusterError as exc:
        problems.append(str(exc))
    base = os.path.dirname(plan.root)
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        problems.append(f"site.tmp_base {base!r} is not a writable directory")
    return problems
