"""The site=local config for code that runs outside any job, read from conf/site/local.yaml."""

from __future__ import annotations

import functools
from typing import Any

from ..config import as_typed


@functools.lru_cache(maxsize=1)
def _local_site_tree() -> Any:
    from importlib.resources import files

    from omegaconf import OmegaConf

    return OmegaConf.load(str(files("toksearch_launch.conf.site").joinpath("local.yaml")))


def default_local_config(**overrides: Any) -> Any:
    """The site=local config (this machine, loopback pseudo-nodes), typed like a job's."""
    from omegaconf import OmegaConf

    cfg = as_typed(_local_site_tree())
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return cfg
