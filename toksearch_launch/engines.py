"""Optional cluster engines: the module each needs and the extra that installs it.

A plain ``pip install toksearch_launch`` has neither Ray, PySpark nor Dask. The CLI checks
with :func:`missing` before it allocates anything (``backend.start=eager``); code in
the job calls :func:`require` before it imports an engine, so the user reads one line
naming the extra instead of a ``ModuleNotFoundError`` traceback. Neither function
imports the engine (``importlib.util.find_spec`` only locates it).
"""

from __future__ import annotations

import importlib.util
from typing import Dict, NamedTuple, Optional


class Engine(NamedTuple):
    module: str  # the top-level module the backend imports
    extra: str  # the optional-dependencies key of pyproject.toml


#: One entry per backend (``backend.name``); a new backend adds its line here.
ENGINES: Dict[str, Engine] = {
    "ray": Engine("ray", "ray"),
    "spark": Engine("pyspark", "spark"),
    "dask": Engine("distributed", "dask"),
}


class EngineMissing(ImportError):
    """An engine is not installed; the message is one line that names the extra to install."""


def missing(name: str) -> Optional[str]:
    """None when backend ``name`` can be imported, else the one-line reason and the fix."""
    engine = ENGINES[name]
    try:
        found = importlib.util.find_spec(engine.module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        found = False
    if found:
        return None
    return (f"backend={name} needs the {engine.module} package, which is not installed here: "
            f"pip install 'toksearch_launch[{engine.extra}]'")


def require(name: str) -> None:
    """Raise :class:`EngineMissing` (one line, naming the extra) unless backend ``name`` is installed."""
    reason = missing(name)
    if reason:
        raise EngineMissing(reason)
