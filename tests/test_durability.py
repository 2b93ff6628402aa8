"""The result store, stop and resume without SLURM: real files, real signals, values against compute_serial."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, compose, run_cli
from durability_job import FIRST_SHOT, assert_same_records, make_pipeline, second_pipeline
from slurm_support import wait_for
from toksearch_launch import Pipeline, SyntheticSignal, load_dataframe, load_results
from toksearch_launch.config import validate
from toksearch_launch.pipeline import stopping
from toksearch_launch.pipeline.record import Record
from toksearch_launch.pipeline.store import (
    MANIFEST,
    StoreMismatch,
    as_columns,
    fingerprint,
    part_files,
    read_header,
    records_of,
    wire_records,
    write_atomic,
)
from toksearch_launch.resume import read_events
from toksearch_launch.plan import Facts, plan_job, slurm_seconds, stop_signal_grace, time_limit

JOB = [sys.executable, str(ROOT / "tests" / "durability_job.py")]


@pytest.fixture(autouse=True)
def fresh_stop_request():
    stopping.STOP.reset()
    yield
    stopping.STOP.reset()


def reference(count: int):
    return make_pipeline(count, 0.0).compute_serial(store=None)


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_store_holds_exactly_the_serial_result(tmp_path, backend):
    store = tmp_path / "store"
    pipeline = make_pipeline(120, 0.0)
    kwargs = {"num_workers": 2, "batch_size": 7} if backend == "multiprocessing" else {}
    result = getattr(pipeline, f"compute_{backend}")(store=store, **kwargs)
    want = reference(120)
    assert_same_records(result, want)
    loaded = load_results(store)
    assert_same_records(loaded, want)
    assert loaded.stats == want.stats
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["state"] == "complete"
    assert manifest["total_records"] == 120 and manifest["records_stored"] == 120
    assert manifest["records_with_errors"] == want.num_errors > 0
    assert not list(store.glob(".*"))  # no temp file left


def test_numpy_and_xarray_records_round_trip(tmp_path):
    xr = pytest.importorskip("xarray")
    pipeline = Pipeline(range(1, 6))
    pipeline.fetch("ip", SyntheticSignal("ip", n=32, dims=("times", "r")))

    @pipeline.map
    def as_dataset(rec):
        data = rec["ip"]
        rec["ds"] = xr.Dataset({"ip": (("times", "r"), data["data"])}, coords={"times": data["times"], "r": data["r"]},
                               attrs={"units": "A"})
        rec["nan"] = np.array([np.nan, 1.0])

    result = pipeline.compute_serial(store=tmp_path / "s")
    loaded = load_results(tmp_path / "s")
    assert_same_records(loaded, result)
    assert loaded[0]["ds"].identical(result[0]["ds"])


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_numpy_scalars_keep_their_type_and_value(tmp_path, layout):
    """Same dtype, same bits, both ways (serial: pickled on the driver; multiprocessing: in the
    worker), whether the store writes a partition as columns (a numpy-scalar column as one array)
    or as rows (odd shots get one more field, so no partition of 2-3 records has one field set:
    numpy scalars as type + Python number)."""
    values = {"f64": np.float64(1 / 3), "f32": np.float32(0.1), "f16": np.float16(0.3), "nan": np.float64("nan"),
              "neg0": np.float64(-0.0), "i64": np.int64(-2**62), "u64": np.uint64(2**64 - 1), "b": np.bool_(True),
              "c64": np.complex64(1 + 2j), "ld": np.longdouble(1) / 3, "dt": np.datetime64("2020-01-01T00:00:00.123")}
    pipeline = Pipeline(range(1, 41))  # serial with a store: 20 partitions of 2

    @pipeline.map
    def scalars(rec):
        rec.update(values)
        if layout == "rows" and rec.shot % 2:
            rec["odd"] = True

    for backend, kwargs in (("serial", {}), ("multiprocessing", {"num_workers": 2, "batch_size": 3})):
        result = getattr(pipeline, f"compute_{backend}")(store=tmp_path / backend, **kwargs)
        for part in part_files(tmp_path / backend):
            with open(part, "rb") as f:
                pickle.load(f)  # the header
                wire = pickle.load(f)[0]
            assert type(wire) is (tuple if layout == "columns" else list), part.name
        for records in (result, load_results(tmp_path / backend)):
            for rec in records:
                for key, want in values.items():
                    got = rec[key]
                    assert type(got) is type(want) and np.array(got).tobytes() == np.array(want).tobytes(), (key, got)


def test_records_go_to_disk_as_columns_when_their_fields_agree_and_as_rows_when_not():
    """One numpy scalar type per column: one array (same type and bits when read back); a column
    that mixes types stays a list; records whose fields differ (in name or order) stay rows."""
    def rec(shot, **fields):
        return Record(shot, fields)

    same = [rec(1, f64=np.float64(0.1), mixed=np.float64(1), py=1.5, arr=np.arange(3), nan=np.float64("nan")),
            rec(2, f64=np.float64(-0.0), mixed=np.float32(2), py=2, arr=np.arange(2), nan=np.float64(-np.nan))]
    same[1]["errors"] = {"fetch ip": {"type": "KeyError", "message": "ip"}}
    fields, columns = as_columns(same)
    assert fields == ("shot", "errors", "f64", "mixed", "py", "arr", "nan")
    kinds = dict(zip(fields, map(type, columns)))
    assert kinds["f64"] is np.ndarray and kinds["nan"] is np.ndarray
    assert kinds["mixed"] is list and kinds["py"] is list and kinds["arr"] is list and kinds["shot"] is list

    differ = [rec(1, a=np.float64(1), b=2), rec(2, b=2, a=np.float64(1)), rec(3, a=np.float64(3))]
    assert as_columns(differ) is None
    assert type(wire_records(differ)) is list

    for records in (same, differ):
        back = records_of(pickle.loads(pickle.dumps(wire_records(records))))
        assert [type(r) for r in back] == [Record] * len(records)
        for got, want in zip(back, records):
            assert list(got) == list(want)  # the fields, in their order
            for key in want:
                assert type(got[key]) is type(want[key]), key
                assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes() or key == "errors", key
            assert got["errors"] == want["errors"]


def test_a_partition_cut_short_by_a_crash_is_computed_again(tmp_path, capsys):
    """A machine crash before the group sync can leave a file under its name but short or
    empty: the next open removes it (one line) and computes its records again; load_results
    skips a file whose records fail their CRC."""
    store = tmp_path / "s"
    make_pipeline(120, 0.0).compute_serial(store=store)
    parts = part_files(store)
    short, empty = parts[1], parts[3]
    short.write_bytes(short.read_bytes()[:-10])
    empty.write_bytes(b"")
    capsys.readouterr()
    result = make_pipeline(120, 0.0).compute_serial(store=store)
    out = capsys.readouterr().out
    assert out.count("removed a damaged partition file") == 2, out
    assert f"{120 - 2 * 6} of 120 records already stored" in out, out
    want = reference(120)
    assert_same_records(result, want)
    assert_same_records(load_results(store), want)

    flipped = part_files(store)[2]
    lost = len(read_header(flipped)["positions"])
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes: only the CRC sees it
    flipped.write_bytes(bytes(data))
    loaded = load_results(store)
    assert "skipped" in capsys.readouterr().err
    assert loaded.info["records_stored"] == 120 - lost and not loaded.info["complete"]


def test_dataframe_of_scalar_fields(tmp_path):
    pytest.importorskip("pandas")
    make_pipeline(30, 0.0).compute_serial(store=tmp_path / "s")
    frame = load_dataframe(tmp_path / "s")
    want = reference(30)
    assert list(frame.index) == [r["shot"] for r in want]
    for rec in want:
        if "max_ip" in rec:
            assert frame.loc[rec["shot"], "max_ip"] == rec["max_ip"]
        else:  # the signal was missing: the map failed, the record has an error
            assert np.isnan(frame.loc[rec["shot"], "max_ip"]) and rec["errors"]
    assert "ip_head" not in frame.columns  # arrays are not scalar fields
    assert list(frame["num_errors"]) == [len(r["errors"]) for r in want]


def test_stop_keeps_finished_partitions_and_resume_computes_only_the_rest(tmp_path, capsys):
    import threading

    store = tmp_path / "store"
    first = make_pipeline(200, 0.005)  # about 1 s: the stop comes in the middle
    timer = threading.Timer(0.4, stopping.STOP.request, (signal.SIGUSR1, 60.0, None))
    timer.start()
    with pytest.raises(SystemExit) as stopped:
        first.compute_serial(store=store)
    timer.join()
    assert stopped.value.code == stopping.EXIT_STOPPED
    assert "records stored in" in capsys.readouterr().out
    partial = load_results(store)
    stored = partial.info["records_stored"]
    assert 0 < stored < 200 and not partial.info["complete"]
    assert json.loads((store / MANIFEST).read_text())["state"] == "stopped"

    stopping.STOP.reset()
    result = make_pipeline(200, 0.005).compute_serial(store=store)
    out = capsys.readouterr().out
    assert f"{stored} of 200 records already stored, skipped; computing {200 - stored}" in out
    assert result.info["records_computed"] == 200 - stored
    want = reference(200)
    assert_same_records(result, want)
    assert_same_records(load_results(store), want)
    assert result.stats == want.stats


def test_another_pipeline_is_refused_in_one_line(tmp_path):
    make_pipeline(20, 0.0).compute_serial(store=tmp_path / "s")
    with pytest.raises(StoreMismatch) as err:
        make_pipeline(21, 0.0).compute_serial(store=tmp_path / "s")
    assert "\n" not in str(err.value) and "another pipeline" in str(err.value)


def test_fingerprint_follows_steps_and_shots_and_is_stable_across_processes():
    base = fingerprint(make_pipeline(10, 0.0).operations, list(range(FIRST_SHOT, FIRST_SHOT + 10)))
    assert base == fingerprint(make_pipeline(10, 0.0).operations, list(range(FIRST_SHOT, FIRST_SHOT + 10)))
    assert base != fingerprint(make_pipeline(10, 0.0).operations, list(range(FIRST_SHOT, FIRST_SHOT + 11)))
    changed = make_pipeline(10, 0.0)
    changed.keep(["max_ip"])
    assert base != fingerprint(changed.operations, list(range(FIRST_SHOT, FIRST_SHOT + 10)))

    def threshold(value):
        p = Pipeline([1, 2])
        p.where(lambda rec: rec.shot > value)
        return fingerprint(p.operations, [1, 2])

    assert threshold(1) != threshold(2)  # a closure's value is part of the function
    code = ("import sys; sys.path.insert(0, 'tests'); from durability_job import make_pipeline;"
            "from toksearch_launch.pipeline.store import fingerprint;"
            f"print(fingerprint(make_pipeline(10, 0.0).operations, list(range({FIRST_SHOT}, {FIRST_SHOT + 10}))))")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == base


def test_sigkill_during_writes_leaves_only_whole_files(tmp_path):
    """A writer killed at arbitrary moments: every partition file there is complete and readable."""
    writer = ("import sys, os; sys.path.insert(0, 'tests');"
              "from durability_job import make_pipeline;"
              "p = make_pipeline(4000, 0.0); p.map(lambda r: r.__setitem__('pad', os.urandom(20000)));"
              f"p.compute_serial(store={str(tmp_path / 's')!r})")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT)
        store = tmp_path / "s"
        deadline_parts = len(part_files(store)) + 3 if store.exists() else 3

        def enough():
            return store.exists() and len(part_files(store)) >= deadline_parts


        wait_for(lambda: enough() or proc.poll() is not None, 120, 0.01, "partitions to be written")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for part in part_files(tmp_path / "s"):
        with open(part, "rb") as f:
            header = pickle.load(f)
            rows, positions, stats = pickle.load(f)
        assert len(rows) == header["records_out"] == len(positions)
    result = load_results(tmp_path / "s")
    assert 0 < result.info["records_stored"] < 4000
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".pkl") and not p.name.startswith("part-")]


def test_write_atomic_replaces_nothing_partially(tmp_path):
    path = tmp_path / "part-x.pkl"
    write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["part-x.pkl"]


# --------------------------------------------------------------------------- plan: warning signal, requeue


@pytest.mark.parametrize("text,seconds", [("2", 120), ("1:30", 90), ("1:00:00", 3600), ("1-2", 93600),
                                          ("1-0:30", 88200), ("2-0:0:5", 172805), ("UNLIMITED", None), ("x", None)])
def test_slurm_time_formats(text, seconds):
    assert slurm_seconds(text) == seconds


def test_time_limit_forms():
    assert time_limit(["--time=2"]) == 120
    assert time_limit(["-t", "3"]) == 180
    assert time_limit(["-t4"]) == 240
    assert time_limit(["--gres=gpu:1"]) is None


def test_grace_is_clamped_to_half_the_limit_and_can_be_turned_off():
    cfg = compose(["mode=batch"])
    assert stop_signal_grace(cfg, ["--time=2"]) == 60
    assert stop_signal_grace(cfg, ["--time=4:00:00"]) == 120
    assert stop_signal_grace(cfg, []) == 120
    assert stop_signal_grace(cfg, ["--signal=B:USR2@30"]) is None  # the user's own signal wins
    off = compose(["site.stop_grace=0"])
    assert stop_signal_grace(off, ["--time=2"]) is None


def test_batch_script_asks_for_the_warning_and_requeue():
    cfg = compose(["mode=batch", "batch.sbatch=['--time=2']", "batch.requeue=true"])
    validate(cfg)
    plan = plan_job(cfg, ["python", "x.py"], Path("/runs/r"), Facts(cwd="/w"))
    lines = plan.script.splitlines()
    assert "#SBATCH --signal=B:USR1@60" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines


def test_interactive_job_warns_itself_grace_before_its_end():
    cfg = compose(["interactive.salloc=['--time=3']"])
    plan = plan_job(cfg, ["python", "x.py"], Path("/runs/r"), Facts(cwd="/w", display=None))
    assert not any(a.startswith("--signal") for a in plan.argv)  # srun would ignore it inside salloc
    assert stopping.self_warning_delay(1000.0, 1180.0, 1000.0, 120.0) == 90.0  # half of a 3-minute limit
    assert stopping.self_warning_delay(0.0, 14400.0, 100.0, 120.0) == 14180.0
    assert stopping.self_warning_delay(0.0, 100.0, 99.0, 120.0) == 0.0  # already inside the grace: at once
    assert stopping.self_warning_delay(0.0, 100.0, 0.0, 0.0) is None  # site.stop_grace=0: off


def test_status_counts_a_partition_cut_short_as_damaged_not_stored(tmp_path):
    """--status reads only headers: a file cut short (or emptied) by a machine crash is named
    as damaged, its records are not counted as stored, and the run is not finished."""
    from toksearch_launch.resume import status_lines, summarize_store

    store = tmp_path / "run" / "results" / "compute-1"
    make_pipeline(120, 0.0).compute_serial(store=store)
    parts = part_files(store)
    short, empty = parts[0], parts[4]
    lost = len(read_header(short)["positions"]) + len(read_header(empty)["positions"])
    short.write_bytes(short.read_bytes()[:-10])
    empty.write_bytes(b"")
    summary = summarize_store(store)
    assert (summary.stored, summary.total, summary.damaged, summary.partitions) == (120 - lost, 120, 2, len(parts) - 2)
    text = "\n".join(status_lines(tmp_path / "run"))
    assert f"compute-1: {120 - lost}/120 records stored" in text, text
    assert "compute-1: 2 damaged partition files (cut short by a machine crash) not counted" in text, text
    assert "not finished: resume with" in text, text


# --------------------------------------------------------------------------- CLI: --status, --resume (site=local)


def test_resume_status_and_finished_run_through_the_cli(tmp_path):
    result = run_cli(["site=local", "-b", "--wait", *JOB, "serial", "40", "0"], tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    assert json.loads((run_dir / "command.json").read_text())["command"][-3:] == ["serial", "40", "0"]
    assert_same_records(load_results(run_dir), reference(40))
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert status.returncode == 0, status.stderr
    assert "compute-1: 40/40 records stored" in status.stdout and "finished" in status.stdout
    assert "jobs: local-" in status.stdout
    again = run_cli(["--resume", str(run_dir)], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stdout and "nothing to resume" in again.stdout


def test_resume_of_a_stopped_local_run_completes_it(tmp_path):
    result = run_cli(["site=local", "-b", *JOB, "serial", "300", "0.02"], tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    pid = int(result.stdout.split("submitted job local-")[1].split(";")[0])

    wait_for(lambda: len(part_files(run_dir / "results" / "compute-1")) >= 3 if (run_dir / "results" / "compute-1").exists() else False,
             60, 0.05, "three partitions stored")
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: "resume with" in (run_dir / "job-local.out").read_text(), 60, what="the stop message")
    stored = load_results(run_dir).info["records_stored"]
    assert 0 < stored < 300
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert f"compute-1: {stored}/300 records stored" in status.stdout
    assert f"not finished: resume with: toksearch_submit --resume {run_dir}" in status.stdout
    resumed = run_cli(["--resume", str(run_dir), "-w"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    out = (run_dir / "job-local.out").read_text()
    assert f"computing {300 - stored}" in out
    assert_same_records(load_results(run_dir), reference(300))


def test_resume_errors_are_one_line(tmp_path):
    for args in (["--resume"], ["--resume", str(tmp_path / "nope")], ["--status"], ["--resume", str(tmp_path)]):
        result = run_cli(args, tmp_path)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("toksearch_submit: error:")


def stopped_local_run(tmp_path, count: int):
    """A site=local batch run of ``count`` records stopped by SIGUSR1 after three partitions."""

    result = run_cli(["site=local", "-b", *JOB, "serial", str(count), "0.02"], tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    pid = int(result.stdout.split("submitted job local-")[1].split(";")[0])
    store = run_dir / "results" / "compute-1"
    wait_for(lambda: store.exists() and len(part_files(store)) >= 3, 60, 0.05, "three partitions stored")
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: "resume with" in (run_dir / "job-local.out").read_text(), 60, what="the stop message")
    return run_dir


def test_changed_pipeline_is_refused_then_fresh_starts_over(tmp_path):
    run_dir = stopped_local_run(tmp_path, 300)
    stored_before = {r["shot"] for r in load_results(run_dir)}
    saved = json.loads((run_dir / "command.json").read_text())
    saved["command"][-2] = "100"  # the script now runs over other shots: another fingerprint
    (run_dir / "command.json").write_text(json.dumps(saved))
    refused = run_cli(["--resume", str(run_dir), "-w"], tmp_path)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    out = (run_dir / "job-local.out").read_text()
    [line] = [ln for ln in out.splitlines() if "holds another pipeline" in ln]
    assert line.startswith("toksearch: result store ") and "--fresh" in line
    assert "Traceback" not in out
    assert {r["shot"] for r in load_results(run_dir)} == stored_before  # nothing was touched
    fresh = run_cli(["--resume", str(run_dir), "--fresh", "-w"], tmp_path)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "earlier results moved to" in fresh.stdout
    [aside] = list(run_dir.glob("results.replaced-*"))
    assert {r["shot"] for r in load_results(aside)} == stored_before
    assert_same_records(load_results(run_dir), reference(100))


def test_a_run_killed_between_two_computes_is_not_finished_and_resume_runs_the_second(tmp_path):
    """The first compute's store is complete and the second never started: the last attempt's
    exit code (137, logged by the job's attempt wrapper) says the run is not finished."""

    hold = tmp_path / "hold"
    hold.write_text("")
    result = run_cli(["site=local", "-b", *JOB, "two", "40", "0", str(hold)], tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    out = run_dir / "job-local.out"
    text = wait_for(lambda: "BETWEEN" in out.read_text() and out.read_text(), 60, 0.05, "the first compute's end")
    script_pid = int(text.split("PID ", 1)[1].split()[0])
    os.kill(script_pid, signal.SIGKILL)
    ended = wait_for(lambda: [e for e in read_events(run_dir) if e["event"] == "command ended"], 60, 0.05,
                     "the attempt's end in jobs.jsonl")
    assert ended[-1]["exit_code"] == 137 and ended[-1]["signal"] == "SIGKILL", ended
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert "compute-1: 40/40 records stored" in status.stdout and "compute-2" not in status.stdout, status.stdout
    assert "last attempt: COMMAND ended with exit code 137 at " in status.stdout, status.stdout
    assert status.stdout.splitlines()[-1] == f"not finished: resume with: toksearch_submit --resume {run_dir}"

    hold.unlink()
    resumed = run_cli(["--resume", str(run_dir), "-w"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    text = out.read_text()
    assert "compute-1: 40 of 40 records already stored, skipped; computing 0" in text, text
    assert "computed 0 records, 40 came from the store" in text, text
    assert "RESULT " in text and "computed=40" in text, text  # the second compute ran in full
    want_first = make_pipeline(40, 0.0).compute_serial(store=None)
    want_second = second_pipeline(40, 0.0).compute_serial(store=None)
    for k, want in ((1, want_first), (2, want_second)):
        got = load_results(run_dir, compute=k)
        assert_same_records(got, want)
        assert got.stats == want.stats
    status = run_cli(["--status", str(run_dir)], tmp_path)
    assert "compute-2: 40/40 records stored" in status.stdout and "ended with exit code 0" in status.stdout
    assert status.stdout.splitlines()[-1] == "finished", status.stdout
    again = run_cli(["--resume", str(run_dir)], tmp_path)
    assert again.returncode == 0 and "nothing to resume" in again.stdout, again.stdout + again.stderr


def test_finished_means_the_last_attempt_ended_with_exit_code_0():
    from toksearch_launch.resume import StoreSummary, is_finished

    complete = [StoreSummary("compute-1", 10, 10, 0, 0, "complete", 1)]
    first = {"job_id": "41", "pid": 7}
    started, ok = dict(first, event="command started", time="t0"), dict(first, event="command ended", exit_code=0, time="t1")
    assert is_finished(complete, [started, ok])
    assert not is_finished(complete, [started])  # killed with its job: no end logged
    assert not is_finished(complete, [started, dict(ok, exit_code=137)])
    assert not is_finished(complete, [started, dict(ok, pid=8)])  # another process's end
    requeued = {"event": "command started", "job_id": "41", "restart": 1, "pid": 7, "time": "t2"}
    assert not is_finished(complete, [started, ok, requeued])  # a later attempt, still running or killed
    assert not is_finished([StoreSummary("compute-1", 10, 9, 0, 0, "running", 1)], [started, ok])
    assert not is_finished(complete, [])  # no attempt logged: never called finished


def test_a_no_requeue_option_is_kept_and_the_job_continues_in_fresh_jobs():
    cfg = compose(["mode=batch", "batch.sbatch=['--time=2','--no-requeue']", "batch.requeue=true"])
    validate(cfg)
    lines = plan_job(cfg, ["python", "x.py"], Path("/runs/r"), Facts(cwd="/w")).script.splitlines()
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --requeue" not in lines


def test_group_sync_syncs_within_its_delay_flushes_on_demand_and_leaves_no_thread(tmp_path, monkeypatch):
    from toksearch_launch.pipeline import store as store_module

    synced = []
    monkeypatch.setattr(store_module, "sync_files", lambda directory, paths: synced.append(list(paths)))
    group = store_module._GroupSync(tmp_path, sync_s=0.05)
    group.written(tmp_path / "a")
    group.written(tmp_path / "b")
    wait_for(lambda: synced == [[tmp_path / "a", tmp_path / "b"]], 10, 0.01, "a and b synced in one group, no flush")
    group.written(tmp_path / "c")
    group.flush()
    assert synced[-1] == [tmp_path / "c"]
    group.flush()  # nothing written since: nothing to sync, returns at once
    assert len(synced) == 2
    wait_for(lambda: not any(t.name == "toksearch-store-sync" for t in threading.enumerate()), 10, 0.01,
             "the store's sync thread to exit")


def test_a_failed_sync_is_raised_in_the_driver(tmp_path, monkeypatch):
    from toksearch_launch.pipeline import store as store_module

    def broken(directory, paths):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "sync_files", broken)
    with pytest.raises(OSError, match="syncing the result store failed"):
        make_pipeline(30, 0.0).compute_serial(store=tmp_path / "s")


def test_many_computes_leave_no_store_thread(tmp_path):
    for k in range(5):
        make_pipeline(20, 0.0).compute_serial(store=tmp_path / f"s{k}")
    wait_for(lambda: not any(t.name == "toksearch-store-sync" for t in threading.enumerate()), 10, 0.01,
             "the store's sync thread to exit")
