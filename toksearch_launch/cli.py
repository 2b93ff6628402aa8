"""``toksearch_submit [launcher flags] [overrides] COMMAND [ARGS...]``.

The command line splits in two: launcher flags and Hydra overrides before COMMAND,
and COMMAND with its arguments, passed on untouched. :mod:`toksearch_launch.sweep`
composes the config of each job with Hydra's compose API (one job, or one per
combination with ``-m``); :mod:`toksearch_launch.plan` turns it into commands and
:mod:`toksearch_launch.run` runs them. Nothing is written before a job really runs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from toksearch_launch.sweep import CFG_PARTS, INFO_TOPICS, Job

PROG = "toksearch_submit"
EXIT_USAGE = 2

USAGE = f"""usage: {PROG} [flags] [key=value ...] COMMAND [ARGS...]

Run COMMAND on a SLURM allocation (or this machine with site=local), with a Ray or
Spark cluster started inside the job when the script asks for one.

  {PROG} -N 3 python toksearch_example.py -- ray
  {PROG} site=saga mode=batch nodes=3 python script.py -- ray
  {PROG} -m mode=batch nodes=1,2,4 python scaling.py -- spark

flags (before COMMAND):
  -N, --nodes N        number of nodes (same as nodes=N; -N3 works too)
  -b, --batch          submit with sbatch (same as mode=batch)
  -d, --dry-run        print every command and the batch script; run nothing
  -m, --multirun       one job per combination of comma-separated override values
  -k, --keep-going     multirun, interactive: go on after a job fails
  -w, --wait           batch: wait for the job to end and exit with its exit code
  --resume RUN_DIR [--fresh] [-w] [key=value ...]
                       rerun a stopped run's command into its run dir; only unstored
                       records are computed (--fresh: set old results aside, start over)
  --status RUN_DIR     job ids, Slurm state, records stored/total and errors of a run
  --cfg {{job,hydra,all}}  print the composed config and exit (Hydra)
  --resolve            with --cfg: resolve interpolations
  --info [TOPIC]       print Hydra's information (config search path, defaults...)
  --config-dir DIR     add DIR to the config search path (your own site/*.yaml)
  -h, --help           this help

overrides (before COMMAND): key=value, +key=value, ~key, group=option
  groups: site=default|saga|local (or your own), mode=interactive|batch, backend=ray|spark
  e.g. nodes=3 'ray.worker.start=[--num-cpus=8]' interactive.salloc=[--time=1:00:00]
  <list>_extra=[...] adds options after the site's: 'interactive.salloc_extra=[--time=1:00:00]'
  (-c is SLURM's --cpus-per-task and is refused: use 'interactive.srun_extra=[--cpus-per-task=N]')

COMMAND: the first word that is not a flag or an override; everything after it is
the command's own (the first `--` after COMMAND is dropped, as in TokSearch, so
`-- ray` reaches the script as `ray`). A `--` before COMMAND ends the flags.
Per-user profiles: $TOKSEARCH_USER_CONF or ~/.config/toksearch_launch (site/NAME.yaml).
"""


class UsageError(Exception):
    """Bad command line: one line for the user, exit code 2."""


@dataclass
class Invocation:
    """The command line, split: what Hydra gets and what the job runs."""

    #: Overrides and Hydra's flags (``--multirun``, ``--cfg X``, ``--resolve``, ``--info [X]``,
    #: ``--config-dir DIR``) in Hydra's own command-line form; :func:`hydra_request` reads them.
    hydra_args: List[str] = field(default_factory=list)
    command: List[str] = field(default_factory=list)
    dry_run: bool = False
    multirun: bool = False
    wait: bool = False
    keep_going: bool = False
    help: bool = False
    hydra_only: bool = False  # --cfg / --info: print and exit, no job runs


@dataclass
class HydraRequest:
    """What the command line asks of Hydra, read back from :attr:`Invocation.hydra_args`."""

    overrides: List[str] = field(default_factory=list)
    config_dirs: List[str] = field(default_factory=list)
    multirun: bool = False
    cfg: Optional[str] = None  # --cfg job|hydra|all
    resolve: bool = False
    info: Optional[str] = None  # --info TOPIC


_OVERRIDE = re.compile(r"^(~[A-Za-z_][\w.\-/@]*(=|$)|(\+\+?)?[A-Za-z_][\w.\-/@]*=)")
_FLAGS_WITH_VALUE = {"-N": "nodes", "--nodes": "nodes", "--cfg": "cfg", "--config-dir": "config-dir", "-cd": "config-dir"}


def _refuse_cpus_flag(tok: str, argv: Sequence[str], i: int) -> None:
    """SLURM's ``-c N`` (cpus per task) is not a launcher flag: say what to write instead, in one line."""
    value = tok[2:].lstrip("=") or (argv[i + 1] if i + 1 < len(argv) else "N")
    raise UsageError(
        f"-c is SLURM's --cpus-per-task, which {PROG} does not set: add it to the job's options, e.g. "
        f"'interactive.srun_extra=[--cpus-per-task={value}]' or 'batch.sbatch_extra=[--cpus-per-task={value}]' "
        "(Hydra's config print is --cfg)")


def _quote_list_items(value: str) -> str:
    """Quote bare list items that Hydra's grammar refuses (``[--num-cpus=8]``: the ``=``)."""
    if not value.startswith("["):
        return value
    out: List[str] = []
    token = ""
    quote: Optional[str] = None
    for ch in value + "\0":
        if quote:
            out.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "[],\0":
            stripped = token.strip()
            if stripped and "=" in stripped:
                token = "'" + stripped.replace("\\", "\\\\").replace("'", "\\'") + "'"
            out.append(token)
            token = ""
            if ch != "\0":
                out.append(ch)
        elif ch in "'\"" and not token.strip():
            out.append(token)
            token = ""
            out.append(ch)
            quote = ch
        else:
            token += ch
    return "".join(out)


def _override(token: str) -> str:
    key, eq, value = token.partition("=")
    return f"{key}={_quote_list_items(value)}" if eq else token


def split_argv(argv: Sequence[str]) -> Invocation:
    """Split the command line; raise UsageError for anything we cannot understand."""
    inv = Invocation()
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            inv.command = argv[i + 1:]
            break
        name, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if tok.startswith("-N") and len(tok) > 2:  # salloc's attached form: -N3, -N=3
            name, eq, inline = "-N", "=", tok[2:].removeprefix("=")
        if tok == "-c" or (tok.startswith("-c") and tok[2:].lstrip("=").isdigit()):
            _refuse_cpus_flag(tok, argv, i)
        if name in _FLAGS_WITH_VALUE:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UsageError(f"{name} needs a value")
            kind = _FLAGS_WITH_VALUE[name]
            if kind == "nodes":
                inv.hydra_args.append(f"nodes={value}")
            elif kind == "cfg":
                if value not in CFG_PARTS:
                    raise UsageError(f"--cfg takes one of {', '.join(CFG_PARTS)} (got {value!r})")
                inv.hydra_args += ["--cfg", value]
                inv.hydra_only = True
            else:
                inv.hydra_args += ["--config-dir", str(Path(value).expanduser().resolve())]
        elif tok in ("-b", "--batch"):
            inv.hydra_args.append("mode=batch")
        elif tok in ("-d", "--dry-run"):
            inv.dry_run = True
        elif tok in ("-m", "--multirun"):
            inv.multirun = True
        elif tok in ("-w", "--wait"):
            inv.wait = True
        elif tok in ("-k", "--keep-going"):
            inv.keep_going = True
        elif tok in ("-h", "--help"):
            inv.help = True
        elif tok == "--resolve":
            inv.hydra_args.append("--resolve")
        elif name == "--info":
            if eq and inline not in INFO_TOPICS:
                raise UsageError(f"--info takes one of {', '.join(INFO_TOPICS)} (got {inline!r})")
            inv.hydra_args += ["--info"] + ([inline] if eq else [])
            if not eq and i + 1 < len(argv) and argv[i + 1] in INFO_TOPICS:
                i += 1
                inv.hydra_args.append(argv[i])
            inv.hydra_only = True
        elif tok.startswith("-"):
            raise UsageError(f"unknown flag {tok!r} (flags go before COMMAND; see {PROG} --help)")
        elif _OVERRIDE.match(tok):
            inv.hydra_args.append(_override(tok))
        else:
            inv.command = argv[i:]
            break
        i += 1
    if inv.command and "--" in inv.command[1:]:
        dash = inv.command.index("--", 1)
        inv.command = inv.command[:dash] + inv.command[dash + 1:]
    if inv.multirun:
        inv.hydra_args.insert(0, "--multirun")
    return inv


def hydra_request(hydra_args: Sequence[str]) -> HydraRequest:
    """Hydra's flags and the overrides of :attr:`Invocation.hydra_args`, checked together."""
    req = HydraRequest()
    args = list(hydra_args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--multirun":
            req.multirun = True
        elif arg == "--resolve":
            req.resolve = True
        elif arg in ("--cfg", "--config-dir"):
            i += 1
            if arg == "--cfg":
                req.cfg = args[i]
            else:
                req.config_dirs.append(args[i])
        elif arg == "--info":
            has_topic = i + 1 < len(args) and args[i + 1] in INFO_TOPICS
            req.info = args[i + 1] if has_topic else "all"
            i += has_topic
        else:
            req.overrides.append(arg)
        i += 1
    if req.multirun + (req.cfg is not None) + (req.info is not None) > 1:
        raise UsageError("only one of -m, --cfg and --info can be given")
    if req.resolve and req.cfg is None:
        raise UsageError("--resolve goes with --cfg (print the composed config resolved)")
    return req


@dataclass
class JobResult:
    """One job of the sweep, for the summary table and the exit code."""

    overrides: List[str]
    run_dir: str
    exit_code: int
    job_id: str = ""
    state: str = ""
    note: str = ""
    scheduler: str = ""
    output: str = ""


def _one_line(exc: BaseException) -> str:
    """The first meaningful line of an exception and of its cause."""
    from hydra.errors import OverrideParseException

    if isinstance(exc, OverrideParseException):
        return f"cannot parse override {exc.override!r}: {str(exc).splitlines()[0]} (see Hydra's override grammar)"
    parts = []
    seen = 0
    while exc is not None and seen < 3:
        text = str(exc).strip()
        if text and text != "None":
            first = text.splitlines()[0].strip()
            if "\nAvailable options in" in text:
                options = [ln.strip() for ln in text.splitlines() if ln.startswith("\t") and "provider=" not in ln]
                first += f" (available: {', '.join(options)})"
            if first not in parts:
                parts.append(first)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if exc is not None and "$VALUE" in str(exc):  # omegaconf's unformatted template
            break
        seen += 1
    return ": ".join(parts) or "unknown error"


def _facts(cfg, cwd: str, dry_run: bool):
    """Gather what the plan depends on; the Slurm version from the config, else from srun."""
    from toksearch_launch.plan import Facts, parse_slurm_version

    version = None
    if cfg.site.scheduler == "slurm":
        if cfg.site.slurm_version:
            version = parse_slurm_version(str(cfg.site.slurm_version))
            if version is None:
                raise ValueError(f"site.slurm_version={cfg.site.slurm_version!r} is not a version like 22.05.8")
        elif not dry_run or shutil.which("srun"):
            from toksearch_launch.run import slurm_version

            version = slurm_version()
    return Facts(
        stdin_is_tty=sys.stdin is not None and sys.stdin.isatty(),
        display=os.environ.get("DISPLAY") or None,
        slurm_version=version,
        cwd=cwd,
        python=sys.executable,
    )


def _shown_script(script: str) -> str:
    """The batch script as printed: the options and COMMAND of its ``#SBATCH`` and ``exec`` lines redacted."""
    import shlex

    from toksearch_launch.procutil import display

    lines = []
    for line in script.splitlines():
        for prefix in ("#SBATCH ", "exec "):
            if line.startswith(prefix):
                line = prefix + display(shlex.split(line[len(prefix):]))
        lines.append(line)
    return "\n".join(lines) + "\n"


def shown_override(override: str) -> str:
    """An override as printed (progress lines, table): secret-looking options in its list redacted."""
    from toksearch_launch.procutil import redact

    key, eq, value = override.partition("=")
    if not eq:
        return override
    items = re.findall(r"[^\[\],'\"\s]+", value)
    shown = iter(redact(items))
    return key + eq + re.sub(r"[^\[\],'\"\s]+", lambda _: next(shown), value)


def _print_dry_run(plan, cfg) -> None:
    from toksearch_launch.procutil import display

    for note in plan.notes:
        print(f"# note: {note}")
    if plan.script is not None:
        print(f"# {plan.script_path}")
        print(_shown_script(plan.script), end="")
    print(f"# run: {display(plan.argv)}")
    try:
        from toksearch_launch.cluster import plan_commands
    except ImportError:  # the starters are optional for a dry run of the launcher
        return
    hosts = [f"node{k}" for k in range(1, cfg.nodes + 1)]
    for backend in ("ray", "spark"):
        try:
            commands = plan_commands(backend, cfg, hosts)
        except Exception as exc:  # a dry run reports, it does not fail on the in-job part
            print(f"# in-job {backend} commands: cannot plan: {_one_line(exc)}")
            continue
        lines = [f"# in-job {backend} cluster, for nodes {','.join(hosts)}:"]
        lines += [f"#   {display(argv)}" for argv in commands]
        print("\n".join(lines))  # one write: 1,000 nodes print 2,000 lines


def _exit_code_of(exc: BaseException) -> int:
    from toksearch_launch.run import LaunchError

    return exc.exit_code if isinstance(exc, LaunchError) else EXIT_USAGE


def _dropped_option_notes(cfg, job: Job) -> List[str]:
    """Notes for option lists the overrides replaced, naming what the site had set (composed again without them)."""
    from hydra import compose

    from toksearch_launch.config import merge_extra_options
    from toksearch_launch.plan import dropped_option_notes, override_key, replaced_option_lists
    from toksearch_launch.sweep import CONFIG_NAME

    keys = replaced_option_lists(job.overrides)
    if not keys:
        return []
    kept = [o for o in job.overrides if override_key(o) not in keys]
    site_cfg = compose(CONFIG_NAME, overrides=[*job.config.hydra.overrides.hydra, *kept])
    return dropped_option_notes(merge_extra_options(site_cfg), cfg, keys)


def _run_jobs(inv: Invocation, jobs: List[Job], cwd: str) -> List[JobResult]:
    """Plan, then print (dry run) or run each job in turn; one result per job.

    A single job's error is raised. In a sweep, a job that cannot be planned or that
    sbatch refuses is recorded with its reason and the sweep goes on, so that jobs
    already submitted are still waited for and shown in the table; only when no job
    ran or was submitted at all is the first error raised (one line, nothing else).
    """
    results: List[JobResult] = []
    first_error: Optional[BaseException] = None
    if not inv.dry_run:
        for job in jobs:
            _require_writable(job.run_dir)
    for job in jobs:
        failed_before = any(r.exit_code != 0 for r in results)
        result = JobResult(job.overrides, str(job.run_dir), EXIT_USAGE, note="not run")
        results.append(result)
        if inv.multirun:
            shown = " ".join(shown_override(o) for o in result.overrides)
            print(f"[{PROG}] job {job.num}: {shown}", file=sys.stderr, flush=True)
        if failed_before and job.config.mode == "interactive" and not inv.keep_going and not inv.dry_run:
            result.exit_code, result.note = 0, "skipped (an earlier job failed; -k goes on)"
            continue
        try:
            with job.active():
                _run_job(inv, job, result, cwd)
        except Exception as exc:
            if not inv.multirun:
                raise
            first_error = first_error or exc
            result.exit_code, result.note = _exit_code_of(exc), f"not submitted: {_one_line(exc)}"
    if first_error is not None and not _started(results):
        raise first_error
    return results


def _require_writable(run_dir: Path) -> None:
    """Refuse a run dir that cannot be made, before any job is planned or said (every job of a
    sweep would fail alike); writes nothing. The error is the OSError mkdir would raise."""
    import errno

    path = Path(os.path.abspath(run_dir))
    child = path
    while not path.exists() and path != path.parent:
        path, child = path.parent, path
    if child != path and path.is_dir() and not os.access(path, os.W_OK):  # an existing run dir: its first write tells
        code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(child))


def _run_job(inv: Invocation, job: Job, result: JobResult, cwd: str) -> None:
    """One job: check and plan it, then print the plan (dry run) or write its run dir and run or submit it."""
    from toksearch_launch.config import WRAPPED_STARTS, ConfigError, merge_extra_options, validate
    from toksearch_launch.plan import plan_job

    cfg = job.task_config()
    try:
        validate(cfg)
        cfg = merge_extra_options(cfg)
        plan = plan_job(cfg, inv.command, job.run_dir, _facts(cfg, cwd, inv.dry_run))
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if cfg.backend.start in WRAPPED_STARTS:  # the wrapper starts the engine at once: check it before allocating
        from toksearch_launch.engines import missing

        reason = missing(cfg.backend.name)
        if reason:
            raise UsageError(reason)
    plan.notes += _dropped_option_notes(cfg, job)

    if inv.dry_run:
        _print_dry_run(plan, cfg)
        result.exit_code, result.note = 0, "dry run"
        return

    from omegaconf import OmegaConf

    from toksearch_launch import resume, run

    if plan.scheduler == "slurm":
        run.require_program(plan.argv[0])  # before anything is written or said
    else:
        run.require_command(inv.command[0])
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    job.run_dir.mkdir(parents=True, exist_ok=True)  # the first file of the run
    OmegaConf.save(cfg, plan.config_path, resolve=True)
    resume.record_command(job.run_dir, inv.command, cwd)  # what --resume reruns
    if plan.script is not None:
        run.write_script(plan.script_path, plan.script)

    if plan.mode == "interactive":
        result.note = ""
        result.exit_code = resume.run_interactive_attempt(plan)  # logs the attempt's start and end
        result.state = "COMPLETED" if result.exit_code == 0 else "FAILED"
        return

    sub = run.submit_batch(plan)
    resume.record_submission(job.run_dir, sub.job_id)
    print(f"{PROG}: submitted job {sub.job_id}; run dir {sub.run_dir}; output {sub.output}", flush=True)
    result.job_id, result.exit_code, result.note = sub.job_id, 0, ""
    result.scheduler, result.output = plan.scheduler, sub.output
    if inv.wait and not inv.multirun:  # a sweep submits every job first, then waits for all
        _wait([result])


def _wait(results: List[JobResult]) -> None:
    """Block until every submitted batch job ends; record each state and exit code as it comes."""
    from toksearch_launch import run

    by_id: dict = {}
    for result in results:
        if result.job_id:
            by_id.setdefault(result.job_id, []).append(result)

    def record(job_id: str, end) -> None:
        missing = _output_missing(by_id[job_id][0], end.state) if end.started else ""
        reason = "; ".join(filter(None, (end.reason, missing)))
        for result in by_id[job_id]:
            result.state, result.exit_code, result.note = end.state, end.exit_code, reason
        why = f": {reason}" if reason else ""
        print(f"{PROG}: job {job_id} {end.state}, exit code {end.exit_code}{why}", flush=True)

    for job_id, same in by_id.items():
        if same[0].scheduler == "local":
            record(job_id, run.wait_local_job(job_id))
    slurm_ids = [job_id for job_id, same in by_id.items() if same[0].scheduler != "local"]
    if slurm_ids:
        run.wait_slurm_jobs(slurm_ids, on_end=record)


def _output_missing(result: JobResult, state: str) -> str:
    """Why a failed job may have said nothing: its output file never appeared here."""
    if state == "COMPLETED" or not result.output or Path(result.output).exists():
        return ""
    return (f"its output {result.output} was never written: the run directory must be on a filesystem "
            "the compute nodes share")


def _print_table(results: List[JobResult]) -> None:
    """One row per job of the sweep, whatever happened to it; the reason, if any, last."""
    rows = [("job", "state", "exit", "overrides", "run dir / reason")]
    for r in results:
        state = r.state or ("NOT_SUBMITTED" if r.note.startswith("not submitted") else r.note.split(" ")[0] or
                            ("submitted" if r.job_id else "-"))
        where = r.run_dir + (f"  ({r.note})" if r.note and r.note != state else "")
        rows.append((r.job_id or "-", state, str(r.exit_code), " ".join(shown_override(o) for o in r.overrides), where))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _run(inv: Invocation, cwd: str) -> List[JobResult]:
    """Compose with Hydra, then answer --info / --cfg, or run the jobs (none of them for --info / --cfg)."""
    from toksearch_launch import sweep

    req = hydra_request(inv.hydra_args)
    with warnings.catch_warnings(), sweep.session():
        # the per-user profile dir (conf/config.yaml's searchpath) usually does not exist: nothing to say
        warnings.filterwarnings("ignore", message=r".*provider=hydra\.searchpath.*is not available")
        overrides = sweep.with_config_dirs(req.overrides, req.config_dirs)
        if req.info is not None:
            sweep.show_info(req.info, overrides)
            return []
        if req.cfg is not None:
            sys.stdout.write(sweep.config_text(sweep.compose(overrides), req.cfg, req.resolve))
            return []
        jobs = sweep.compose_jobs(overrides, req.multirun, cwd)  # all of them before the first runs
        return _run_jobs(inv, jobs, cwd)


def _started(results: List[JobResult]) -> bool:
    """Did any job of the sweep run or get submitted (so its table matters)?"""
    return any(r.job_id or r.state for r in results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``toksearch_submit``; returns (and exits with) the job's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("--resume", "--status"):  # a run dir's, not a new job's (docs/durability.md)
        from toksearch_launch import resume

        return resume.main(argv)
    try:
        inv = split_argv(argv)
        if inv.help or not argv:
            print(USAGE, end="")
            return 0 if inv.help else EXIT_USAGE
        if not inv.command and not inv.hydra_only:
            raise UsageError("no command given: put the program to run after the overrides, e.g. python script.py")
        results = _run(inv, os.getcwd())
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # above all a run dir that cannot be written, before anything is allocated
        from toksearch_launch.run import unwritable_run_dir

        error = unwritable_run_dir(exc)
        print(f"{PROG}: error: {error or _one_line(exc)}", file=sys.stderr)
        return error.exit_code if error else EXIT_USAGE
    except Exception as exc:  # Hydra/omegaconf/launch errors: one line, never a traceback
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return _exit_code_of(exc)
    if inv.multirun and inv.wait:
        _wait(results)
    if inv.multirun and results and not inv.dry_run:
        _print_table(results)
    return next((r.exit_code for r in results if r.exit_code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
