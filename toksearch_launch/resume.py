"""A run after its job: ``--resume`` (rerun it into the same run dir), ``--status``, requeue.

A run directory holds what a later command needs: ``toksearch.yaml`` (the
resolved config), ``command.json`` (COMMAND and its working directory, written
at submission), ``jobs.jsonl`` (one line per event: submitted, compute started,
stopped, requeued, resubmitted, refused; each with the Slurm job id) and
``results/`` (the stores, :mod:`toksearch_launch.pipeline.store`). Each attempt
of COMMAND logs ``command started`` and ``command ended`` (its exit code): the
batch job's :mod:`toksearch_launch.attempt` wrapper, or the launcher for an
interactive job. A run is finished only when its last attempt ended with exit
code 0 and every store it opened is complete. The pipeline itself skips what is
stored; this module only reruns the command, says what state a run is in, and
decides what a job does after a clean stop.

Imported by the CLI: no numpy, no Ray, no Spark, no Hydra at import time.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PROG = "toksearch_submit"
COMMAND_FILE = "command.json"
RUN_LOG = "jobs.jsonl"
RESULTS = "results"
#: The events one attempt of COMMAND logs (toksearch_launch.attempt, or the launcher in interactive mode).
STARTED = "command started"
ENDED = "command ended"
#: Slurm states in which a job may still run (a resume must not race it).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


class ResumeError(Exception):
    """A run that cannot be resumed or read; the message is one line."""


# --------------------------------------------------------------------------- the run's log


def current_run_dir() -> Optional[Path]:
    from toksearch_launch.config import RUN_DIR_ENV

    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def log_event(run_dir: Optional[os.PathLike], event: str, in_job: bool = True, **fields: Any) -> None:
    """Append one event to ``jobs.jsonl`` (one short line: O_APPEND keeps concurrent writers whole).

    ``in_job``: the job id and restart count come from the job's environment (False for the
    launcher, which may itself run inside some other allocation)."""
    run_dir = Path(run_dir) if run_dir else current_run_dir()
    if run_dir is None or not run_dir.is_dir():
        return
    entry: Dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event}
    job_id = fields.pop("job_id", None) or (os.environ.get("SLURM_JOB_ID") if in_job else None)
    if job_id:
        entry["job_id"] = str(job_id)
    if in_job and os.environ.get("SLURM_RESTART_COUNT"):
        entry["restart"] = int(os.environ["SLURM_RESTART_COUNT"])
    entry.update(fields)
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = os.open(run_dir / RUN_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / RUN_LOG
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return events


def record_command(run_dir: os.PathLike, command: Sequence[str], cwd: str) -> None:
    """At submission: what ``--resume`` reruns (COMMAND as the user typed it, and where)."""
    data = json.dumps({"command": list(command), "cwd": cwd}, indent=1)
    (Path(run_dir) / COMMAND_FILE).write_text(data + "\n", encoding="utf-8")


def record_submission(run_dir: os.PathLike, job_id: str, how: str = "submitted") -> None:
    log_event(run_dir, how, in_job=False, job_id=job_id)


def run_interactive_attempt(plan: Any) -> int:
    """An interactive job's COMMAND, its start and its exit code logged by the launcher, which
    outlives the job's processes (a SIGKILL of the script, scancel, the time limit: salloc
    returns their exit code); a killed launcher logs no end, which reads as not finished."""
    from toksearch_launch import run

    log_event(plan.run_dir, STARTED, in_job=False, pid=os.getpid())
    code = 1
    try:
        code = run.run_interactive(plan)
    except run.LaunchError as exc:
        code = exc.exit_code
        raise
    finally:
        log_event(plan.run_dir, ENDED, in_job=False, pid=os.getpid(), exit_code=code)
    return code


def job_ids(run_dir: Path) -> List[str]:
    """Every Slurm job id of the run, in order (submissions, and jobs seen from inside)."""
    seen: Dict[str, None] = {}
    for event in read_events(run_dir):
        if event.get("job_id"):
            seen.setdefault(str(event["job_id"]), None)
        if event.get("new_job_id"):
            seen.setdefault(str(event["new_job_id"]), None)
    return list(seen)


def resume_command(run_dir: os.PathLike, extra: Sequence[str] = ()) -> str:
    return shlex.join([PROG, "--resume", str(Path(run_dir).resolve()), *extra])


# --------------------------------------------------------------------------- Slurm


def slurm_job(job_id: str) -> Dict[str, str]:
    """``scontrol show job -o`` as a dict; empty when Slurm no longer lists it (after MinJobAge)."""
    import re

    if job_id.startswith("local-"):
        return {}
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def job_state(job_id: str) -> str:
    return slurm_job(job_id).get("JobState", "") or "unknown (no longer listed by Slurm)"


# --------------------------------------------------------------------------- stores


@dataclass
class StoreSummary:
    name: str
    total: int
    stored: int
    records_with_errors: int
    where_errors: int
    state: str
    partitions: int
    #: partition files cut short by a machine crash: not counted; a resume computes their records again
    damaged: int = 0

    @property
    def complete(self) -> bool:
        return self.stored >= self.total


def summarize_store(path: Path) -> StoreSummary:
    """Counts from the partition files themselves (a SIGKILL leaves the manifest behind them).

    Only each file's first pickle (a header of plain ints and strings) is read, by the
    store's own :func:`check_partition` (the store module imports no numpy: the CLI
    stays light). A file whose header is unreadable, or whose size is not the header's
    and its body's, was cut short by a machine crash: it is counted as damaged, not as
    stored (the CRC of its records is left to load_results and to the resume, which
    read them anyway)."""
    from toksearch_launch.pipeline.store import DamagedPartition, check_partition, part_files

    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    stored = errors = where = parts = damaged = 0
    total_from_parts = 0
    for part in part_files(path):
        try:
            header = check_partition(part)
        except (DamagedPartition, OSError):
            damaged += 1
            continue
        total_from_parts = header.get("total_records", 0) or total_from_parts
        stored += len(header["positions"])
        errors += header["records_with_errors"]
        where += header["where_errors"]
        parts += 1
    total = int(manifest.get("total_records", total_from_parts or stored))
    state = manifest.get("state", "unknown")
    if state == "running" and stored >= total:
        state = "complete"
    return StoreSummary(path.name, total, stored, errors, where, state, parts, damaged)


def summaries(run_dir: Path) -> List[StoreSummary]:
    base = run_dir / RESULTS
    stores = sorted((p for p in base.glob("compute-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    return [summarize_store(p) for p in stores]


@dataclass
class Attempt:
    """One run of COMMAND, from its ``command started`` event (and its ``command ended``, if logged)."""

    job_id: Optional[str]
    restart: int
    started: str
    ended: Optional[str] = None
    exit_code: Optional[int] = None

    def describe(self) -> str:
        who = f"job {self.job_id}" + (f" (restart {self.restart})" if self.restart else "") if self.job_id else "COMMAND"
        if self.exit_code is None:
            return f"{who} started at {self.started}, no end logged (still running, or killed with its job)"
        return f"{who} ended with exit code {self.exit_code} at {self.ended}"


def _attempt_key(event: Dict[str, Any]) -> tuple:
    return event.get("job_id"), event.get("restart"), event.get("pid")


def last_attempt(events: Sequence[Dict[str, Any]]) -> Optional[Attempt]:
    """The last attempt of COMMAND, with the end logged after its start by the same process (if any)."""
    starts = [i for i, e in enumerate(events) if e.get("event") == STARTED]
    if not starts:
        return None
    start = events[starts[-1]]
    attempt = Attempt(start.get("job_id"), int(start.get("restart", 0)), start.get("time", "?"))
    end = next((e for e in events[starts[-1] + 1:] if e.get("event") == ENDED and _attempt_key(e) == _attempt_key(start)),
               None)
    if end is not None:
        attempt.ended, attempt.exit_code = end.get("time", "?"), int(end.get("exit_code", 1))
    return attempt


def is_finished(stores: Sequence[StoreSummary], events: Sequence[Dict[str, Any]]) -> bool:
    """The last attempt's COMMAND ended with exit code 0, and every compute it started has all its records.

    The exit code, not the stores alone: a script killed between two computes has a
    complete first store and no second one. A run without a logged attempt (an older
    launcher's) is never finished: its resume reruns COMMAND, which skips what is stored."""
    attempt = last_attempt(events)
    return attempt is not None and attempt.exit_code == 0 and all(s.complete for s in stores)


# --------------------------------------------------------------------------- status


def status_lines(run_dir: Path) -> List[str]:
    events = read_events(run_dir)
    stores = summaries(run_dir)
    lines = [f"run dir: {run_dir}"]
    ids = job_ids(run_dir)
    if ids:
        lines.append("jobs: " + ", ".join(f"{j} {job_state(j)}" for j in ids))
    else:
        lines.append("jobs: none recorded")
    if not stores:
        lines.append("results: none stored yet")
    for s in stores:
        lines.append(f"{s.name}: {s.stored}/{s.total} records stored ({s.partitions} partitions), "
                     f"{s.records_with_errors} with errors, {s.where_errors} dropped by a raising where(); {s.state}")
        if s.damaged:
            lines.append(f"{s.name}: {s.damaged} damaged partition file{'s' if s.damaged > 1 else ''} (cut short by a "
                         "machine crash) not counted; a resume computes their records again")
    last = next((e for e in reversed(events) if e.get("event") in ("stopped", "requeued", "resubmitted", "refused")), None)
    if last:
        detail = last.get("reason") or last.get("message") or ""
        lines.append(f"last event: {last['event']} at {last['time']}" + (f" ({detail})" if detail else ""))
    attempt = last_attempt(events)
    lines.append(f"last attempt: {attempt.describe()}" if attempt else "last attempt: none logged")
    active = [j for j in ids if slurm_job(j).get("JobState") in ACTIVE_STATES]
    if is_finished(stores, events):
        lines.append("finished")
    elif active:
        lines.append(f"running: job {active[-1]} {job_state(active[-1])}")
    else:
        lines.append(f"not finished: resume with: {resume_command(run_dir)}")
    return lines


# --------------------------------------------------------------------------- resume


@dataclass
class ResumeRequest:
    run_dir: Path
    overrides: List[str] = field(default_factory=list)
    fresh: bool = False
    wait: bool = False


def parse_resume_args(args: Sequence[str]) -> ResumeRequest:
    """``RUN_DIR [--fresh] [-w] [key=value ...]``."""
    rest = list(args)
    if not rest or rest[0].startswith("-"):
        raise ResumeError("--resume needs the run directory: --resume RUN_DIR [--fresh] [-w] [key=value ...]")
    req = ResumeRequest(Path(rest.pop(0)).expanduser().resolve())
    for tok in rest:
        if tok == "--fresh":
            req.fresh = True
        elif tok in ("-w", "--wait"):
            req.wait = True
        elif "=" in tok and not tok.startswith("-"):
            req.overrides.append(tok)
        else:
            raise ResumeError(f"--resume: unexpected {tok!r} (only --fresh, -w and key=value overrides; "
                              "the command is the run's own)")
    return req


def check_run_dir(run_dir: Path) -> Dict[str, Any]:
    from toksearch_launch.config import CONFIG_FILE

    if not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG_FILE).exists():
        raise ResumeError(f"{run_dir} is not a toksearch_submit run directory (no {CONFIG_FILE})")
    if not (run_dir / COMMAND_FILE).exists():
        raise ResumeError(f"{run_dir} has no {COMMAND_FILE} (submitted by an older toksearch_submit): "
                          "rerun the command by hand with store=... or submit it again")
    return json.loads((run_dir / COMMAND_FILE).read_text())


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> None:
    """Hydra's override grammar on the saved (resolved) config: plain keys only, no config groups."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from toksearch_launch.cli import _override

    parsed = OverridesParser.create().parse_overrides([_override(o) for o in overrides])
    for ov in parsed:
        key = ov.key_or_group
        try:
            OmegaConf.update(cfg, key, ov.value(), merge=False)
        except Exception as exc:
            raise ResumeError(f"cannot apply {ov.input_line!r} to the saved config ({str(exc).splitlines()[0]}); "
                              "a resume takes key=value overrides of saved keys, e.g. 'batch.sbatch=[--time=30]'") from None


def move_results_aside(run_dir: Path) -> Optional[Path]:
    """``--fresh``: the old results are kept, renamed, never deleted."""
    results = run_dir / RESULTS
    if not results.exists():
        return None
    target = run_dir / f"{RESULTS}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    results.rename(target)
    return target


def resume(req: ResumeRequest) -> int:
    from omegaconf import OmegaConf

    from toksearch_launch import run
    from toksearch_launch.config import ConfigError, as_typed, validate
    from toksearch_launch.plan import Facts, plan_job

    saved = check_run_dir(req.run_dir)
    active = [j for j in job_ids(req.run_dir) if slurm_job(j).get("JobState") in ACTIVE_STATES]
    if active:
        raise ResumeError(f"job {active[-1]} of this run is still {job_state(active[-1])}: wait for it, "
                          f"or scancel {active[-1]} first")
    if req.fresh:
        moved = move_results_aside(req.run_dir)
        if moved:
            print(f"{PROG}: --fresh: earlier results moved to {moved}; starting over", flush=True)
    else:
        stores = summaries(req.run_dir)
        if is_finished(stores, read_events(req.run_dir)):
            counts = ", ".join(f"{s.name} {s.stored}/{s.total}" for s in stores)
            print(f"{PROG}: run {req.run_dir} is finished ({counts} records stored): nothing to resume", flush=True)
            return 0
    cfg = as_typed(OmegaConf.load(req.run_dir / "toksearch.yaml"))
    OmegaConf.set_struct(cfg, True)
    apply_overrides(cfg, req.overrides)
    try:
        validate(cfg)
        version = run.slurm_version() if cfg.site.scheduler == "slurm" else None
        facts = Facts(stdin_is_tty=sys.stdin is not None and sys.stdin.isatty(),
                      display=os.environ.get("DISPLAY") or None, slurm_version=version,
                      cwd=saved.get("cwd", os.getcwd()), python=sys.executable)
        plan = plan_job(cfg, saved["command"], req.run_dir, facts)
    except (ConfigError, ValueError) as exc:
        raise ResumeError(str(exc)) from None
    if plan.scheduler == "slurm":
        run.require_program(plan.argv[0])
    OmegaConf.save(cfg, plan.config_path, resolve=True)
    if plan.script is not None:
        run.write_script(plan.script_path, plan.script)
    log_event(req.run_dir, "resume", in_job=False, overrides=list(req.overrides), fresh=req.fresh)
    if plan.mode == "interactive":
        return run_interactive_attempt(plan)
    sub = run.submit_batch(plan)
    record_submission(req.run_dir, sub.job_id, "submitted")
    print(f"{PROG}: resuming run {req.run_dir}: submitted job {sub.job_id}; output {sub.output}", flush=True)
    if req.wait:
        waiter = run.wait_local_job if plan.scheduler == "local" else run.wait_slurm_job
        end = waiter(sub.job_id)
        reason = f" ({end.reason})" if end.reason else ""
        print(f"{PROG}: job {sub.job_id} {end.state}, exit code {end.exit_code}{reason}", flush=True)
        return end.exit_code
    return 0


# --------------------------------------------------------------------------- after a clean stop


def continue_after_stop(run_dir: Path, timed_out: bool) -> None:
    """Inside a batch job stopped by Slurm's warning: requeue it (``batch.requeue``), or, where
    Slurm refuses requeues, submit a fresh job that resumes the run once this one has ended."""
    from toksearch_launch.config import load_job_config

    cfg = load_job_config()
    job_id = os.environ.get("SLURM_JOB_ID")
    if cfg is None or cfg.mode != "batch" or not cfg.batch.requeue or not job_id:
        return
    events = read_events(run_dir)
    refused_jobs = {e.get("job_id") for e in events if e.get("event") == "requeue refused"}
    timeouts = sum(1 for e in events if e.get("timed_out") and (
        e.get("event") == "resubmitted" or (e.get("event") == "requeued" and e.get("job_id") not in refused_jobs)))
    if timed_out and timeouts >= int(cfg.batch.max_requeues):
        print(f"toksearch: batch.max_requeues={cfg.batch.max_requeues} reached: not requeueing; "
              f"resume with: {resume_command(run_dir)}", flush=True)
        return
    attempt = timeouts + (1 if timed_out else 0)
    why = "time limit" if timed_out else "preemption"
    # Said and logged before asking: once Slurm accepts the requeue it kills this job at once,
    # so the request is said as a request; a refusal is said after it.
    print(f"toksearch: asking Slurm to requeue job {job_id} after its {why} (requeue {attempt} of at most "
          f"{cfg.batch.max_requeues}); if it accepts, this job ends now and its next start resumes "
          "where it stopped", flush=True)
    log_event(run_dir, "requeued", timed_out=timed_out, attempt=attempt)
    try:
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        refused = out.returncode != 0
        message = " ".join((out.stderr or out.stdout).split())
    except (OSError, subprocess.SubprocessError) as exc:
        refused, message = True, str(exc)
    if not refused:
        return
    log_event(run_dir, "requeue refused", message=message)
    script = run_dir / "job.sbatch"
    sub = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job_id}", str(script)],
                         capture_output=True, text=True, timeout=30)
    if sub.returncode != 0:
        print(f"toksearch: Slurm refused the requeue ({message}) and a new job ({' '.join(sub.stderr.split())}); "
              f"resume with: {resume_command(run_dir)}", flush=True)
        return
    new_id = sub.stdout.strip().split(";")[0]
    log_event(run_dir, "resubmitted", timed_out=timed_out, attempt=attempt, new_job_id=new_id, message=message)
    print(f"toksearch: Slurm refused to requeue job {job_id} ({message}): submitted job {new_id} instead, "
          "which resumes the run when this one ends", flush=True)


# --------------------------------------------------------------------------- entry


def main(argv: Sequence[str]) -> int:
    """``--resume RUN_DIR ...`` or ``--status RUN_DIR`` (called by the CLI)."""
    flag, args = argv[0], list(argv[1:])
    try:
        if flag == "--status":
            if len(args) != 1:
                raise ResumeError("--status needs exactly one run directory: --status RUN_DIR")
            run_dir = Path(args[0]).expanduser().resolve()
            if not run_dir.is_dir():
                raise ResumeError(f"{run_dir}: no such run directory")
            print("\n".join(status_lines(run_dir)))
            return 0
        return resume(parse_resume_args(args))
    except ResumeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # LaunchError and config errors: one line, never a traceback
        from toksearch_launch.cli import _one_line

        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
