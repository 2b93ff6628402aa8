"""Local signals: SyntheticSignal, FileSignal and the demo-archive writer."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from toksearch_launch.signals import FileSignal, Signal, SyntheticSignal
from toksearch_launch.signals.local import (
    SignalNotFound,
    demo_archive_covers,
    ensure_demo_archive,
    write_demo_archive,
)


def test_package_exports_lazily():
    code = (
        "import sys, toksearch_launch.signals as s; "
        "assert 'mdsthin' not in sys.modules and 'h5py' not in sys.modules; "
        "assert s.FileSignal.__name__ == 'FileSignal' and s.SyntheticSignal.__name__ == 'SyntheticSignal'; "
        "assert 'h5py' not in sys.modules; "
        "assert set(s.__all__) >= {'Signal', 'FileSignal', 'SyntheticSignal', 'MdsSignal'}"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synthetic_follows_the_contract():
    sig = SyntheticSignal("ipmhd", n=50)
    assert isinstance(sig, Signal)
    out = sig.gather(165920)
    assert set(out) == {"data", "times", "units"}
    assert out["data"].shape == (50,) and out["times"].shape == (50,)
    assert out["units"] == {"data": "A", "times": "ms"}
    assert np.all(np.diff(out["times"]) > 0)
    # A current waveform: zero at t=0, a flat top near its maximum.
    assert out["data"][0] == 0.0
    assert 0.8e6 * 0.95 < np.max(np.abs(out["data"])) < 1.6e6 * 1.05


def test_synthetic_is_deterministic_across_processes():
    sig = SyntheticSignal("ipmhd", seed=3)
    here = sig.gather(165925)["data"]
    code = (
        "import numpy as np, sys; from toksearch_launch.signals import SyntheticSignal; "
        "np.save(sys.stdout.buffer, SyntheticSignal('ipmhd', seed=3).gather(165925)['data'])"
    )
    # A fresh interpreter has a different str-hash seed: the data must not depend on it.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    raw = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env).stdout
    import io

    there = np.load(io.BytesIO(raw))
    np.testing.assert_array_equal(here, there)


def test_synthetic_depends_on_shot_name_and_seed():
    a = SyntheticSignal("ipmhd").gather(1)["data"]
    assert not np.array_equal(a, SyntheticSignal("ipmhd").gather(2)["data"])
    assert not np.array_equal(a, SyntheticSignal("bt").gather(1)["data"])
    assert not np.array_equal(a, SyntheticSignal("ipmhd", seed=1).gather(1)["data"])


def test_synthetic_missing_shots_raise():
    sig = SyntheticSignal("ipmhd", missing_every=5)
    sig.gather(11)
    with pytest.raises(SignalNotFound, match="shot 10"):
        sig.gather(10)


def test_synthetic_latency_is_slept():
    sig = SyntheticSignal("ipmhd", latency=0.02)
    start = time.perf_counter()
    for shot in range(5):
        sig.gather(shot)
    assert time.perf_counter() - start >= 5 * 0.02


def test_synthetic_multidim_and_data_order():
    sig = SyntheticSignal("te", dims=("times", "channels"), data_order=("channels", "times"), n=20, extra_dim_size=4)
    out = sig.gather(7)
    assert out["data"].shape == (4, 20)
    assert out["channels"].shape == (4,)
    plain = SyntheticSignal("te", dims=("times", "channels"), n=20, extra_dim_size=4).gather(7)
    np.testing.assert_array_equal(out["data"], plain["data"].T)
    with pytest.raises(ValueError):
        SyntheticSignal("te", dims=("times",), data_order=("channels",))


def test_synthetic_without_units():
    assert "units" not in SyntheticSignal("ipmhd", fetch_units=False).gather(1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archive") / "demo.h5"
    write_demo_archive(path, first_shot=100, count=30, signals=["ipmhd", "bt"], n=40, missing_every=7)
    return path


def test_file_signal_matches_synthetic(archive: Path):
    for name in ("ipmhd", "bt"):
        fsig, ssig = FileSignal(name, archive), SyntheticSignal(name, n=40)
        for shot in (100, 101, 129):
            a, b = fsig.gather(shot), ssig.gather(shot)
            np.testing.assert_array_equal(a["data"], b["data"])
            np.testing.assert_array_equal(a["times"], b["times"])
            assert a["units"] == b["units"] == {"data": "A", "times": "ms"}
        fsig.cleanup()


def test_file_signal_missing_shot(archive: Path):
    sig = FileSignal("ipmhd", archive)
    with pytest.raises(SignalNotFound, match="shot 105"):
        sig.gather(105)  # 105 % 7 == 0: left out of the archive
    with pytest.raises(SignalNotFound):
        sig.gather(99999)
    with pytest.raises(SignalNotFound):
        FileSignal("nosuchsignal", archive).gather(100)
    sig.cleanup()


def test_file_signal_pickles_without_handle_and_reopens(archive: Path):
    sig = FileSignal("ipmhd", archive)
    sig.gather(100)
    assert sig._h5 is not None
    clone = pickle.loads(pickle.dumps(sig))
    assert clone._h5 is None
    np.testing.assert_array_equal(clone.gather(101)["data"], sig.gather(101)["data"])
    sig.cleanup()
    assert sig._h5 is None
    sig.gather(102)  # lazily reopened after cleanup
    sig.cleanup()
    clone.cleanup()


def test_archive_coverage_and_reuse(tmp_path: Path):
    path = tmp_path / "a.h5"
    assert not demo_archive_covers(path, 1, 10, ["ipmhd"])
    ensure_demo_archive(path, first_shot=1, count=10, signals=["ipmhd"], n=10)
    stamp = path.stat().st_mtime_ns
    assert demo_archive_covers(path, 2, 5, ["ipmhd"], n=10)
    ensure_demo_archive(path, first_shot=2, count=5, signals=["ipmhd"], n=10)
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not demo_archive_covers(path, 1, 11, ["ipmhd"], n=10)
    assert not demo_archive_covers(path, 1, 10, ["bt"], n=10)
    ensure_demo_archive(path, first_shot=1, count=11, signals=["ipmhd"], n=10)
    assert demo_archive_covers(path, 1, 11, ["ipmhd"], n=10)
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]  # no temp file left behind


def test_make_demo_command_writes_every_shot(tmp_path: Path):
    """The make-demo command's archive holds every shot, equal to the synthetic signal (its
    speed is a benchmark's business, not a test's: the machine may be loaded)."""
    path = tmp_path / "demo.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "toksearch_launch.signals.local", "make-demo", str(path),
         "--shots", "165920", "--count", "10000", "--signal", "ipmhd"],
        capture_output=True, text=True, check=True,
    )
    assert "wrote 10000 shots" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # no double import under python -m
    sig = FileSignal("ipmhd", path)
    np.testing.assert_array_equal(sig.gather(175919)["data"], SyntheticSignal("ipmhd").gather(175919)["data"])
    with pytest.raises(SignalNotFound):
        sig.gather(175920)
    sig.cleanup()
