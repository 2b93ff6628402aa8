"""The jobs of a run, composed with Hydra's compose API: one job, or one per combination with ``-m``.

The CLI does not run a ``@hydra.main`` app: it composes each job's config with
``hydra.compose`` and expands a sweep with Hydra's override parser, by the rules of
Hydra's basic sweeper (one job per combination in command-line order; a key given
twice keeps its first place and its last value; ``hydra.*`` overrides go to every job
unswept). Every job is composed before any runs, so a value that cannot be composed
stops a sweep before anything is written; and nothing is written here at all: the run
directories are named, not made (the CLI makes one when its job really runs).
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

#: The packaged config groups and the primary config in them.
CONFIG_MODULE = "toksearch_launch.conf"
CONFIG_NAME = "config"
#: ``hydra.job.name`` (what the former ``@hydra.main`` app in cli.py was called).
JOB_NAME = "cli"


class SweepError(ValueError):
    """An override that ``-m`` cannot sweep, or a search path that is not there: one line for the user."""


# --------------------------------------------------------------------------- sweep expansion


def _choices(override: Any) -> List[str]:
    """Every ``key=value`` this override stands for: its swept values, or itself."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if override.is_hydra_override():
        raise SweepError(f"Sweeping over Hydra's configuration is not supported: '{override.input_line}'")
    if not override.is_discrete_sweep():  # interval(...) has no list of values
        raise SweepError(f"cannot sweep '{override.input_line}': -m takes a,b,c, range(...), sort(...) or glob(...)")
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def expand(overrides: Sequence[str], config_loader: Optional[Any] = None) -> List[List[str]]:
    """The override list of each job of the sweep, job 0 first.

    ``config_loader`` (Hydra's, from ``GlobalHydra``) lets ``site=glob(*)`` list the
    options of a config group; without it only value sweeps expand.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides))
    unswept_hydra: List[str] = []
    by_key: Dict[str, List[str]] = {}  # insertion order: a key given again keeps its first place
    for override in parsed:
        if override.is_hydra_override() and not override.is_sweep_override():
            unswept_hydra.append(override.input_line)
        else:
            by_key[override.get_key_element()] = _choices(override)
    return [unswept_hydra + list(job) for job in itertools.product(*by_key.values())]


# --------------------------------------------------------------------------- search path


def _quoted(text: str) -> str:
    """One item of an override list, quoted for Hydra's grammar (paths may hold spaces, commas, quotes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _primary_searchpath() -> List[str]:
    """``hydra.searchpath`` of conf/config.yaml, resolved (the per-user profile directory)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    primary = OmegaConf.create(files(CONFIG_MODULE).joinpath(f"{CONFIG_NAME}.yaml").read_text(encoding="utf-8"))
    return [str(p) for p in OmegaConf.to_container(primary.hydra.searchpath, resolve=True)]


def with_config_dirs(overrides: Sequence[str], config_dirs: Sequence[str]) -> List[str]:
    """``--config-dir DIR`` as Hydra's own ``hydra.searchpath`` override: each DIR, then the search
    path the command line (``hydra.searchpath=[...]``) or else conf/config.yaml gives."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not config_dirs:
        return list(overrides)
    for directory in config_dirs:
        if not os.path.isdir(directory):
            raise SweepError(f"Additional config directory '{directory}' not found")
    given = [o for o in overrides if o.split("=", 1)[0] == "hydra.searchpath"]
    rest = [o for o in overrides if o not in given]
    later = list(OverridesParser.create().parse_override(given[-1]).value()) if given else _primary_searchpath()
    paths = [f"file://{d}" for d in config_dirs] + [str(p) for p in later]
    return [*rest, f"hydra.searchpath=[{','.join(_quoted(p) for p in paths)}]"]


# --------------------------------------------------------------------------- composition


@dataclass
class Job:
    """One job of the run: its composed config (with the ``hydra`` node) and where it runs."""

    num: int
    config: Any  # DictConfig, hydra node included (HydraConfig is set from it)
    run_dir: Path

    @property
    def overrides(self) -> List[str]:
        """The job's own overrides, as Hydra records them (``hydra.overrides.task``)."""
        return list(self.config.hydra.overrides.task)

    def task_config(self) -> Any:
        """The job's config without the ``hydra`` node (what a ``@hydra.main`` task receives)."""
        import copy

        from omegaconf import open_dict, read_write

        task = copy.deepcopy(self.config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return task

    @contextmanager
    def active(self) -> Iterator[None]:
        """This job as Hydra's current one (``${hydra:...}``), with ``hydra.job.env_set`` applied."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import env_override

        HydraConfig.instance().set_config(self.config)
        with env_override(dict(self.config.hydra.job.env_set)):
            yield


def compose(overrides: Sequence[str]) -> Any:
    """The primary config with these overrides, hydra node included (inside :func:`session`)."""
    from hydra import compose as hydra_compose

    return hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)


def session() -> Any:
    """Hydra initialised on the packaged config module, for the ``with`` block that composes and runs."""
    from hydra import initialize_config_module

    from toksearch_launch.config import register_configs

    register_configs()
    return initialize_config_module(CONFIG_MODULE, job_name=JOB_NAME, version_base=None)


def _name_run_dir(config: Any, cwd: str, sweep: bool) -> Path:
    """The job's directory from ``hydra.run.dir``, or ``hydra.sweep.dir``/``subdir``; recorded as
    ``hydra.runtime.output_dir`` as Hydra's launcher does. Nothing is created."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    HydraConfig.instance().set_config(config)  # the patterns may read ${hydra:...}
    parts = ["hydra.sweep.dir", "hydra.sweep.subdir"] if sweep else ["hydra.run.dir"]
    run_dir = Path(os.path.abspath(os.path.join(cwd, *(str(OmegaConf.select(config, p)) for p in parts))))
    with read_write(config.hydra):
        config.hydra.runtime.output_dir = str(run_dir)
    return run_dir


def compose_jobs(overrides: Sequence[str], multirun: bool, cwd: str) -> List[Job]:
    """Every job of the run, composed (inside :func:`session`) before any of them runs."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, read_write

    if not multirun:
        config = compose(overrides)
        with read_write(config.hydra):
            config.hydra.mode = "RUN"
        return [Job(0, config, _name_run_dir(config, cwd, sweep=False))]
    jobs: List[Job] = []
    for num, job_overrides in enumerate(expand(overrides, GlobalHydra.instance().config_loader())):
        config = compose(job_overrides)
        with read_write(config.hydra):
            config.hydra.mode = "MULTIRUN"
            config.hydra.job.num = num
            config.hydra.job.id = str(num)
        if jobs:  # resolved values (${now:...} in the sweep dir) are job 0's, as in Hydra's sweeps
            OmegaConf.copy_cache(from_config=jobs[0].config, to_config=config)
        jobs.append(Job(num, config, _name_run_dir(config, cwd, sweep=True)))
    return jobs


# --------------------------------------------------------------------------- --cfg and --info

CFG_PARTS = ("job", "hydra", "all")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def config_text(config: Any, part: str, resolve: bool) -> str:
    """``--cfg job|hydra|all``: the composed tree (or its hydra node) as YAML, as Hydra prints it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, flag_override

    HydraConfig.instance().set_config(config)  # (which makes the hydra node read-only)
    OmegaConf.set_readonly(config.hydra, None)
    with flag_override(config, ["struct", "readonly"], [False, False]):
        keep = {"job": lambda k: k != "hydra", "hydra": lambda k: k == "hydra", "all": lambda k: True}[part]
        for key in [k for k in config if not keep(k)]:
            del config[key]
    if part == "hydra":
        with flag_override(config.hydra, ["struct", "readonly"], [False, False]):
            del config.hydra["hydra_help"], config.hydra["help"]
    if resolve:
        OmegaConf.resolve(config)
    return OmegaConf.to_yaml(config)


def show_info(topic: str, overrides: Sequence[str]) -> None:
    """``--info TOPIC``: Hydra's own report (search path, defaults list and tree, plugins).

    Hydra has no public function for it: this is the one call into the Hydra object
    that ``initialize_config_module`` set up (``GlobalHydra.instance().hydra``)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().hydra.show_info(topic, CONFIG_NAME, list(overrides))
