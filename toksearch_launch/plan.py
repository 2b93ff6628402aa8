"""Pure planning: the composed config and the user's command become exact argument lists.

Nothing here runs a program or reads the environment: everything the plan depends
on (is stdin a terminal, is DISPLAY set, which Slurm version) comes in as
:class:`Facts`, so every plan is testable without SLURM. The commands are lists of
strings, never shell strings; ``shlex`` quoting appears only in the batch script
(a file bash reads) and in :func:`toksearch_launch.procutil.display`.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from toksearch_launch.config import CONFIG_ENV, CONFIG_FILE, RUN_DIR_ENV, WRAPPED_STARTS

Version = Tuple[int, ...]

#: First Slurm release whose srun refuses ``--exclusive`` and ``--overlap`` on one step
#: ("srun: error: --exclusive and --overlap are mutually exclusive"): see
#: :func:`refuses_exclusive_with_overlap` for the source of this boundary.
EXCLUSIVE_OVERLAP_REFUSED_SINCE: Version = (21, 8)

#: Name of the batch script written into the run directory.
BATCH_SCRIPT = "job.sbatch"
#: Output file of a batch job, relative to the run directory (%j: the job id).
BATCH_OUTPUT = "slurm-%j.out"
#: Output file of a batch job on site=local (no job id exists before it starts).
LOCAL_BATCH_OUTPUT = "job-local.out"


@dataclass(frozen=True)
class Facts:
    """What the plan needs to know about the submitting machine, gathered by the caller."""

    stdin_is_tty: bool = True
    display: Optional[str] = ":0"
    slurm_version: Optional[Version] = None
    cwd: str = "."
    python: str = sys.executable


@dataclass
class Plan:
    """One submission: the argv to run, the batch script (batch mode) and what to tell the user."""

    mode: str
    scheduler: str
    argv: List[str]
    run_dir: Path
    env: Dict[str, str]
    script: Optional[str] = None
    output: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    #: The override that removes X11 forwarding, named in the error if salloc fails on X11.
    x11_fix: Optional[str] = None

    @property
    def script_path(self) -> Path:
        return self.run_dir / BATCH_SCRIPT

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE


def parse_slurm_version(text: str) -> Optional[Version]:
    """``slurm 22.05.8`` (``srun --version``) -> (22, 5, 8); None when there is no version."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def refuses_exclusive_with_overlap(version: Optional[Version]) -> bool:
    """Does this srun reject ``--exclusive`` together with ``--overlap`` on one step?

    ``--overlap`` came in Slurm 20.11, where every 20.11.x accepts it beside
    ``--exclusive`` (TokSearch's saga output shows the pair). Slurm 21.08.0 rejects
    the pair: commit ab24d55bb4 "Make --exclusive and --overlap mutually exclusive."
    (Bug 11448; NEWS for 21.08.0rc1: "Reject srun that requests both --exclusive and
    --overlap."), in src/srun/libsrun/opt.c ``_opt_verify``. Unknown version: assume
    nothing and plan what the options say.
    """
    return version is not None and tuple(version[:2]) >= EXCLUSIVE_OVERLAP_REFUSED_SINCE


def slurm_seconds(text: str) -> Optional[int]:
    """A Slurm time (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in seconds; None if unlimited/unparsable."""
    text = text.strip()
    days = 0
    if "-" in text:
        day, _, text = text.partition("-")
        if not day.isdigit():
            return None
        days = int(day)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            return None
        h, m, sec = (list(map(int, parts)) + [0, 0])[:3]
        return ((days * 24 + h) * 60 + m) * 60 + sec
    parts = text.split(":")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    values = list(map(int, parts))
    if len(values) == 1:
        return values[0] * 60
    if len(values) == 2:
        return values[0] * 60 + values[1]
    return (values[0] * 60 + values[1]) * 60 + values[2]


def time_limit(options: Sequence[str]) -> Optional[int]:
    """Seconds of the last ``--time``/``-t`` among sbatch/salloc options (None: the partition's default)."""
    limit: Optional[int] = None
    options = list(options)
    for i, opt in enumerate(options):
        value = None
        if opt.startswith("--time="):
            value = opt[len("--time="):]
        elif opt in ("--time", "-t") and i + 1 < len(options):
            value = options[i + 1]
        elif opt.startswith("-t") and len(opt) > 2 and not opt.startswith("--"):
            value = opt[2:]
        if value is not None:
            limit = slurm_seconds(value)
    return limit


def stop_signal_grace(cfg: DictConfig, options: Sequence[str]) -> Optional[int]:
    """Seconds of warning before the time limit: ``site.stop_grace``, at most half the limit
    (so a 2-minute job still runs a minute); None when off or the user gave a ``--signal``."""
    grace = float(cfg.site.stop_grace)
    if grace <= 0 or any(str(o).startswith("--signal") for o in options):
        return None
    limit = time_limit(options)
    if limit:
        grace = min(grace, limit / 2)
    return max(1, int(grace))


def _is_x11(option: str) -> bool:
    return option == "--x11" or option.startswith("--x11=")


def _without_x11(options: Sequence[str], key: str, facts: Facts, notes: List[str]) -> List[str]:
    """Drop --x11 options when there is no X display: salloc would refuse to start."""
    options = list(options)
    if facts.display:
        return options
    dropped = [o for o in options if _is_x11(o)]
    if dropped:
        notes.append(f"DISPLAY is not set: dropped {' '.join(dropped)} from {key} (no X11 forwarding)")
    return [o for o in options if not _is_x11(o)]


def _job_env(run_dir: Path) -> Dict[str, str]:
    return {CONFIG_ENV: str(run_dir / CONFIG_FILE), RUN_DIR_ENV: str(run_dir)}


def job_command(cfg: DictConfig, command: Sequence[str], facts: Facts) -> List[str]:
    """COMMAND as the job runs it: wrapped by the in-job cluster starter when asked."""
    if cfg.backend.start not in WRAPPED_STARTS:
        return list(command)
    start = [] if cfg.backend.start == "eager" else ["--start", cfg.backend.start]
    return [facts.python, "-m", "toksearch_launch.cluster.eager", "--backend", cfg.backend.name, *start,
            "--", *command]


#: Exit code of a job whose node cannot see the run directory.
EXIT_RUN_DIR_INVISIBLE = 1


def run_dir_check(config: str) -> str:
    """Shell test the job's first step runs before COMMAND: the config the launcher wrote must be
    visible on the node, else the run dir is not on a shared filesystem and nothing else
    (cluster logs, results) would work either. ``config`` is a shell word naming the file."""
    return (f'[ -r "{config}" ] || {{ echo "toksearch: {config} is not visible on $(hostname): the run directory '
            'must be on a filesystem the compute nodes share (choose one with hydra.run.dir=...)" >&2; '
            f'exit {EXIT_RUN_DIR_INVISIBLE}; }}')


def checked_command(config_path: Path, command: Sequence[str]) -> List[str]:
    """COMMAND run on the node behind the run-dir check (``sh -c 'CHECK; shift; exec "$@"' toksearch CONFIG COMMAND...``;
    ``$0`` is the name sh gives its own errors: ``toksearch: 1: exec: prog: not found``)."""
    return ["/bin/sh", "-c", run_dir_check("$1") + '; shift; exec "$@"', "toksearch", str(config_path), *command]


def x11_fix(cfg: DictConfig) -> Optional[str]:
    """The override a user types to drop X11 forwarding, if the options ask for it."""
    options = list(cfg.interactive.salloc)
    if not any(_is_x11(o) for o in options):
        return None
    kept = ",".join(o for o in options if not _is_x11(o))
    return shlex.quote(f"interactive.salloc=[{kept}]")


def interactive_argv(cfg: DictConfig, command: Sequence[str], facts: Facts, notes: List[str]) -> List[str]:
    """``salloc -N N --exclusive <salloc> srun -u --pty -N 1 --exclusive --propagate <srun> COMMAND``."""
    salloc_opts = _without_x11(cfg.interactive.salloc, "interactive.salloc", facts, notes)
    srun_opts = _without_x11(cfg.interactive.srun, "interactive.srun", facts, notes)
    argv = ["salloc", "-N", str(cfg.nodes)]
    if cfg.site.exclusive:
        argv.append("--exclusive")
    argv += salloc_opts
    argv += ["srun", "-u"]
    if facts.stdin_is_tty:
        argv.append("--pty")
    else:
        notes.append("stdin is not a terminal: running the step without --pty")
    argv += ["-N", "1"]
    if "--overlap" in srun_opts and refuses_exclusive_with_overlap(facts.slurm_version):
        notes.append(
            f"Slurm {version_text(facts.slurm_version)} refuses --exclusive with --overlap on one step: "
            "the interactive step keeps --overlap and drops --exclusive"
        )
    else:
        argv.append("--exclusive")
    argv += ["--propagate", *srun_opts]
    # No --signal here: srun applies it only to an allocation it creates, not to a step inside
    # salloc's, and salloc's would signal every step (the cluster daemons too). An interactive
    # job warns itself instead (toksearch_launch.pipeline.stopping.arm_self_warning).
    return argv + list(command)


def version_text(version: Optional[Version]) -> str:
    """(22, 5, 8) -> "22.05.8", as Slurm prints it (year.month.patch)."""
    if not version:
        return "unknown"
    parts = [str(version[0])] + [f"{version[1]:02d}"] + [str(p) for p in version[2:]]
    return ".".join(parts)


def _sbatch_line(*tokens: str) -> str:
    for token in tokens:
        if "\n" in token:
            raise ValueError(f"batch.sbatch option {token!r} contains a newline")
    return "#SBATCH " + " ".join(shlex.quote(t) for t in tokens)


#: The batch script's marker argument for its second pass, run by toksearch_launch.attempt.
ATTEMPT_ARG = "--attempt"
ATTEMPT_COMMENT = ("# One attempt of COMMAND: toksearch_launch.attempt logs its start and exit code in jobs.jsonl "
                   "(what --status and --resume go by), passes Slurm's signals on, and runs this script again as its child.")


def attempt_line(python: str) -> str:
    """The batch script's first pass execs the attempt wrapper, which reruns the script with
    ``--attempt``; that second pass goes on to ``exec COMMAND`` (so COMMAND is still exec'd by
    the shell, as without the wrapper)."""
    return (f'[ "$1" = {ATTEMPT_ARG} ] || exec {shlex.quote(python)} -m toksearch_launch.attempt -- '
            f'/bin/bash "$0" {ATTEMPT_ARG}')


def batch_script(cfg: DictConfig, command: Sequence[str], run_dir: Path, facts: Facts, notes: List[str]) -> str:
    """The job.sbatch file: #SBATCH options, the job's environment, then COMMAND (shlex-quoted)."""
    lines = ["#!/bin/bash", _sbatch_line("-N", str(cfg.nodes))]
    options = ["--exclusive"] if cfg.site.exclusive else []
    options += _without_x11(cfg.batch.sbatch, "batch.sbatch", facts, notes)
    grace = stop_signal_grace(cfg, options)
    if grace:  # B: the batch step's process gets it (the attempt wrapper, which passes it to COMMAND), not every step
        options.append(f"--signal=B:USR1@{grace}")
    if cfg.batch.requeue and "--no-requeue" not in options:  # the requeued attempt appends to the same output file
        options += ["--requeue", "--open-mode=append"]
    # With the user's --no-requeue Slurm refuses `scontrol requeue`: the job then continues in
    # a fresh job instead (toksearch_launch.resume.continue_after_stop), as on a site that forbids requeues.
    options += [f"--job-name={cfg.batch.job_name}", f"--output={run_dir / BATCH_OUTPUT}"]
    lines += [_sbatch_line(o) for o in options]
    lines.append("# Written by toksearch_submit; the job reads its config from TOKSEARCH_CONFIG.")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in _job_env(run_dir).items()]
    if cfg.site.scheduler == "slurm":
        lines.append("# The run directory must be on a filesystem the nodes share: fail at once if not.")
        lines.append(run_dir_check("$" + CONFIG_ENV))
    lines.append(ATTEMPT_COMMENT)
    lines.append(attempt_line(facts.python))
    lines.append(f"cd {shlex.quote(facts.cwd)}")
    # exec: COMMAND replaces the second pass's shell, so the signals the attempt wrapper passes on
    # (Slurm signals only the batch step's process, not its children) reach it and it can stop its cluster.
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def override_key(override: str) -> str:
    """``++interactive.salloc=[...]`` -> ``interactive.salloc``."""
    return override.partition("=")[0].lstrip("+~")


def replaced_option_lists(overrides: Sequence[str]) -> List[str]:
    """The option lists (``interactive.salloc``, ...) that these overrides set outright."""
    from toksearch_launch.config import option_list_keys

    lists = set(option_list_keys())
    return [override_key(o) for o in overrides if override_key(o) in lists and "=" in o]


def dropped_option_notes(site_cfg: DictConfig, cfg: DictConfig, keys: Sequence[str]) -> List[str]:
    """One note per replaced list that lost options the site (or profile) set, and how to add instead."""
    from omegaconf import OmegaConf

    notes = []
    for key in keys:
        kept = list(OmegaConf.select(cfg, key) or [])
        dropped = [o for o in OmegaConf.select(site_cfg, key) or [] if o not in kept]
        if dropped:
            notes.append(f"{key}=[...] replaces the site={site_cfg.site.name} options and drops {' '.join(dropped)} "
                         f"(to add options instead, use {key}_extra=[...])")
    return notes


def plan_job(cfg: DictConfig, command: Sequence[str], run_dir: Path, facts: Facts) -> Plan:
    """Compose the full submission for one job of the (possibly multirun) sweep."""
    if not command:
        raise ValueError("no command given: put the program to run after the overrides, e.g. python script.py")
    notes: List[str] = []
    run_dir = Path(run_dir)
    cmd = job_command(cfg, command, facts)
    env = _job_env(run_dir)
    scheduler = cfg.site.scheduler
    if cfg.mode == "interactive":
        if scheduler == "local":
            return Plan(cfg.mode, scheduler, cmd, run_dir, env, notes=notes)
        argv = interactive_argv(cfg, checked_command(run_dir / CONFIG_FILE, cmd), facts, notes)
        return Plan(cfg.mode, scheduler, argv, run_dir, env, notes=notes, x11_fix=x11_fix(cfg) if facts.display else None)
    script = batch_script(cfg, cmd, run_dir, facts, notes)
    if scheduler == "local":
        argv = ["bash", str(run_dir / BATCH_SCRIPT)]
        output = run_dir / LOCAL_BATCH_OUTPUT
    else:
        argv = ["sbatch", "--parsable", str(run_dir / BATCH_SCRIPT)]
        output = run_dir / BATCH_OUTPUT
    return Plan(cfg.mode, scheduler, argv, run_dir, env, script=script, output=output, notes=notes)
