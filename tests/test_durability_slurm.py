"""Nothing lost, on the real 3-node SLURM test cluster: time limit, scancel, SIGKILL, requeue.

Every outcome is compared with compute_serial of the same pipeline record by
record and value by value. The pipeline's fetches sleep (tests/durability_job.py),
so a run takes a known time; waits poll Slurm's job state with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from durability_job import assert_same_records, make_pipeline, second_pipeline
from slurm_support import TEST_SITE, job_field, job_id_from, wait_for
from toksearch_launch import load_results
from toksearch_launch.pipeline.store import part_files, read_header, read_partition
from toksearch_launch.resume import job_ids, read_events

pytestmark = pytest.mark.slurm

JOB = [sys.executable, str(ROOT / "tests" / "durability_job.py")]
#: A resume's pace: the saved command's per-shot sleep is for the first job (to be stopped mid-run);
#: the resumed job only has to finish, and the pace is not part of the pipeline's fingerprint.
FAST_RESUME = {"DURABILITY_JOB_LATENCY": "0.01"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def submit(tmp_path: Path, *args: str):
    result = run_cli([*TEST_SITE, "-b", *args], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_from(result.stdout)
    run_dir = Path(re.search(r"run dir (\S+);", result.stdout).group(1))
    return job_id, run_dir


def wait_final(job_id: str, timeout: float) -> str:
    return wait_for(lambda: job_field(job_id, "JobState") if job_field(job_id, "JobState") in FINAL else "",
                    timeout, 1.0, f"job {job_id} to end")


def store_of(run_dir: Path) -> Path:
    return run_dir / "results" / "compute-1"


def stored_shots(run_dir: Path) -> set:
    return {shot for part in part_files(store_of(run_dir)) for shot in read_header(part)["shots"]}


def assert_partial_is_exact(run_dir: Path, want) -> int:
    """What is stored is exactly serial's result for the stored shots; returns the number of input records."""
    shots = stored_shots(run_dir)
    partial = load_results(run_dir)
    assert_same_records(partial, [r for r in want if r["shot"] in shots])
    assert partial.info["records_stored"] == len(shots)
    return len(shots)


def only_whole_files(run_dir: Path) -> None:
    """Every file of the store is a manifest or a partition that reads in full: no partial file."""
    for path in store_of(run_dir).iterdir():
        assert path.name == "manifest.json" or (path.name.startswith("part-") and path.suffix == ".pkl"), path
        if path.suffix == ".pkl":
            header, records, positions, _ = read_partition(path)  # checks the size and the CRC-32 too
            assert len(records) == len(positions) == header["records_out"]


def resume_and_check(tmp_path: Path, run_dir: Path, stored: int, total: int, want, *overrides: str) -> str:
    resumed = run_cli(["--resume", str(run_dir), "batch.sbatch=[--time=10]", *overrides, "-w"], tmp_path,
                      env=FAST_RESUME, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_id = re.search(r"submitted job (\d+)", resumed.stdout).group(1)
    text = (run_dir / f"slurm-{new_id}.out").read_text()
    assert f"{stored} of {total} records already stored, skipped; computing {total - stored}" in text, text
    assert f"computed {total - stored} records" in text, text
    final = load_results(run_dir)
    assert_same_records(final, want)
    assert final.stats == want.stats
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert f"compute-1: {total}/{total} records stored" in status.stdout and "finished" in status.stdout, status.stdout
    return text


REQUEUE_TOTAL = 400


@pytest.fixture(scope="module")
def requeue_job(tmp_path_factory):
    """The requeue test's one submission, made when the time-limit test starts, so that the two
    jobs' minutes of waiting on Slurm's clock run side by side (1 node beside that test's 2)."""
    tmp = tmp_path_factory.mktemp("requeue")
    job_id, run_dir = submit(tmp, "nodes=1", "batch.sbatch=[--time=2]", "batch.requeue=true",
                             "site.stop_grace=30", *JOB, "serial", str(REQUEUE_TOTAL), "0.3")
    return tmp, job_id, run_dir


def test_time_limit_stops_cleanly_then_resume_completes(tmp_path, requeue_job):
    """2-minute limit, a Ray pipeline needing about 4: stopped on the warning, resumed, exact."""
    total = 960
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    job_id, run_dir = submit(tmp_path, "nodes=2", "batch.sbatch=[--time=2]", *JOB, "ray", str(total), "1.0", "96")
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@60" in script  # 120 s grace clamped to half the limit
    state = wait_final(job_id, 400)
    text = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state == "FAILED" and job_field(job_id, "ExitCode") == "75:0", (state, text)
    assert "SIGUSR1 received" in text, text
    assert "stopped (SIGUSR1, the time limit is near)" in text, text
    assert f"resume with: toksearch_submit --resume {run_dir}" in text, text
    only_whole_files(run_dir)
    stored = assert_partial_is_exact(run_dir, want)
    assert 0 < stored < total
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert f"jobs: {job_id} FAILED" in status.stdout, status.stdout
    assert f"compute-1: {stored}/{total} records stored" in status.stdout
    assert f"not finished: resume with: toksearch_submit --resume {run_dir}" in status.stdout
    resume_and_check(tmp_path, run_dir, stored, total, want)


@pytest.mark.parametrize("how", ["scancel", "sigkill"])
def test_killed_mid_run_keeps_every_finished_partition(tmp_path, how):
    """scancel (SIGTERM, then SIGKILL after KillWait) or SIGKILL of the script: no flush, nothing partial."""
    total = 400
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    job_id, run_dir = submit(tmp_path, "nodes=1", *JOB, "serial", str(total), "0.2")
    out = run_dir / f"slurm-{job_id}.out"
    pid = int(wait_for(lambda: out.exists() and re.search(r"^PID (\d+)", out.read_text(), re.M), 120,
                       what="the job's PID").group(1))
    wait_for(lambda: store_of(run_dir).exists() and len(part_files(store_of(run_dir))) >= 5, 120, 0.1,
             "five partitions stored")
    if how == "scancel":
        os.spawnvp(os.P_WAIT, "scancel", ["scancel", job_id])
    else:
        os.kill(pid, signal.SIGKILL)
    state = wait_final(job_id, 120)
    assert state == ("CANCELLED" if how == "scancel" else "FAILED"), state
    only_whole_files(run_dir)
    stored = assert_partial_is_exact(run_dir, want)
    assert 0 < stored < total
    resume_and_check(tmp_path, run_dir, stored, total, want)


def test_requeue_finishes_by_itself(requeue_job):
    """batch.requeue=true: one submission under a 2-minute limit requeues itself until done."""
    tmp_path, job_id, run_dir = requeue_job
    total = REQUEUE_TOTAL
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    state = wait_for(lambda: job_field(job_id, "JobState") if job_field(job_id, "JobState") in FINAL - {"PREEMPTED"} else "",
                     1200, 2.0, f"job {job_id} to complete through its requeues")
    text = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", text
    assert int(job_field(job_id, "Restarts")) >= 1
    assert f"asking Slurm to requeue job {job_id} after its time limit" in text, text
    assert "records already stored, skipped" in text  # the requeued attempt resumed; same output file
    final = load_results(run_dir)
    assert_same_records(final, want)
    assert final.stats == want.stats
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert "finished" in status.stdout and f"{total}/{total}" in status.stdout, status.stdout


def test_interactive_step_gets_the_warning_and_stops_cleanly(tmp_path):
    """salloc --time=2 ... srun ...: the job warns itself 60 s before its end and stops cleanly."""
    total = 300
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    result = run_cli([*TEST_SITE, "nodes=1", "interactive.salloc=[--time=2]", *JOB, "serial", str(total), "0.5"],
                     tmp_path, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 75, output  # the pipeline's "stopped, resume me" status reaches the user
    assert "SIGUSR1 received" in output and "stopped (SIGUSR1, the time limit is near)" in output, output
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    assert f"resume with: toksearch_submit --resume {run_dir}" in output
    only_whole_files(run_dir)
    stored = assert_partial_is_exact(run_dir, want)
    assert 0 < stored < total


NO_REQUEUE_TOTAL = 200


def test_requeue_refused_continues_in_fresh_jobs(tmp_path):
    """batch.requeue=true with --no-requeue: Slurm refuses `scontrol requeue`, so each stopped job
    submits a fresh job that resumes the run; one submission under a 1-minute limit completes."""
    total = NO_REQUEUE_TOTAL
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    first, run_dir = submit(tmp_path, "nodes=1", "batch.sbatch=[--time=1]", "batch.sbatch_extra=[--no-requeue]",
                            "batch.requeue=true", "batch.max_requeues=6", "site.stop_grace=20",
                            *JOB, "serial", str(total), "0.25")
    assert job_field(first, "Requeue") == "0"  # the job is not requeueable: scontrol requeue must fail

    def chain_done():
        ids = job_ids(run_dir)
        return ids if len(ids) > 1 and job_field(ids[-1], "JobState") in FINAL else None

    ids = wait_for(chain_done, 900, 2.0, "the chain of fresh jobs to end")
    first_text = (run_dir / f"slurm-{first}.out").read_text()
    assert job_field(first, "JobState") == "FAILED" and job_field(first, "ExitCode") == "75:0", first_text
    said = re.search(rf"Slurm refused to requeue job {first} \((.+)\): submitted job (\d+) instead, "
                     "which resumes the run when this one ends", first_text)
    assert said and said.group(2) == ids[1], first_text
    assert job_field(ids[-1], "JobState") == "COMPLETED", (run_dir / f"slurm-{ids[-1]}.out").read_text()
    events = read_events(run_dir)
    for job_id in ids:  # every attempt is in the run dir: its start, its end, its output file
        assert any(e["event"] == "command started" and e.get("job_id") == job_id for e in events), (job_id, events)
        assert (run_dir / f"slurm-{job_id}.out").exists()
    refused = [e for e in events if e["event"] == "requeue refused"]
    resubmitted = [e for e in events if e["event"] == "resubmitted"]
    assert [e["job_id"] for e in refused] == [e["job_id"] for e in resubmitted] == ids[:-1]
    assert [e["new_job_id"] for e in resubmitted] == ids[1:]
    ends = {e["job_id"]: e["exit_code"] for e in events if e["event"] == "command ended"}
    assert ends == {**{j: 75 for j in ids[:-1]}, ids[-1]: 0}, events
    last_text = (run_dir / f"slurm-{ids[-1]}.out").read_text()
    assert "records already stored, skipped" in last_text, last_text
    final = load_results(run_dir)
    assert_same_records(final, want)
    assert final.stats == want.stats
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert f"{total}/{total}" in status.stdout and status.stdout.splitlines()[-1] == "finished", status.stdout


def test_scancel_between_two_computes_then_resume_runs_the_second(tmp_path):
    """The first compute complete, the second never started: not finished; the resume skips the
    first entirely and computes the second."""
    count = 60
    hold = tmp_path / "hold"
    hold.write_text("")
    job_id, run_dir = submit(tmp_path, "nodes=1", *JOB, "two", str(count), "0", str(hold))
    out = run_dir / f"slurm-{job_id}.out"
    wait_for(lambda: out.exists() and "BETWEEN" in out.read_text(), 120, 0.2, "the first compute's end")
    os.spawnvp(os.P_WAIT, "scancel", ["scancel", job_id])
    assert wait_final(job_id, 120) == "CANCELLED"
    ended = wait_for(lambda: [e for e in read_events(run_dir) if e["event"] == "command ended"], 30, 0.2,
                     "the attempt's end in jobs.jsonl")
    assert ended[-1]["exit_code"] == 143 and ended[-1]["signal"] == "SIGTERM", ended
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert f"compute-1: {count}/{count} records stored" in status.stdout and "compute-2" not in status.stdout
    assert status.stdout.splitlines()[-1].startswith("not finished: resume with"), status.stdout
    hold.unlink()
    resumed = run_cli(["--resume", str(run_dir), "-w"], tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_id = re.search(r"submitted job (\d+)", resumed.stdout).group(1)
    text = (run_dir / f"slurm-{new_id}.out").read_text()
    assert f"compute-1: {count} of {count} records already stored, skipped; computing 0" in text, text
    assert f"computed={count}" in text, text  # the second compute ran in full
    for k, want in ((1, make_pipeline(count, 0.0)), (2, second_pipeline(count, 0.0))):
        want = want.compute_serial(store=None)
        got = load_results(run_dir, compute=k)
        assert_same_records(got, want)
        assert got.stats == want.stats
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert status.stdout.splitlines()[-1] == "finished", status.stdout
