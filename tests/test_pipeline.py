"""Records, pipeline steps, result sets and the no-cluster backends (serial, multiprocessing).

Module-level helpers here (picklable steps, a deep comparison, fixed cases) are
also used by the property test and the Ray/Spark tests.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import sys
import warnings
from contextlib import redirect_stdout
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

from toksearch_launch import Pipeline, Record
from toksearch_launch.pipeline import ProtectedFieldError, ResultSet
from toksearch_launch.pipeline.driver import default_numparts, median_size, split_evenly
from toksearch_launch.pipeline.record import InvalidRecordField, InvalidShotNumber, MissingShotNumber
from toksearch_launch.signals import Signal, SyntheticSignal

# --------------------------------------------------------------------------- helpers


def deep_equal(a: Any, b: Any) -> bool:
    """Structural equality that understands numpy arrays, NaN and xarray objects (values, coords, attrs)."""
    if type(a).__module__.startswith("xarray") or type(b).__module__.startswith("xarray"):
        return type(a) is type(b) and a.identical(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict) and isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_same_results(got: ResultSet, want: ResultSet) -> None:
    """Same records (all fields, errors with tracebacks) in the same order, and the same drop counts."""
    assert [r.shot for r in got] == [r.shot for r in want]
    for g, w in zip(got, want):
        assert isinstance(g, Record)
        assert deep_equal(dict(g), dict(w)), f"shot {g.shot}: {g!r} != {w!r}"
    for attr in ("records_in", "records_out", "filtered", "where_errors", "where_error_shots", "records_with_errors"):
        assert getattr(got.stats, attr) == getattr(want.stats, attr), attr


class SetField:
    """map: rec[field] = shot * factor."""

    def __init__(self, field: str, factor: int) -> None:
        self.field, self.factor = field, factor
        self.__name__ = f"set_{field}"

    def __call__(self, rec: Record) -> None:
        rec[self.field] = rec.shot * self.factor


class MaxAbs:
    """map: rec[dst] = max |rec[src]['data']| (raises if src is missing or None)."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst = src, dst
        self.__name__ = f"max_{src}"

    def __call__(self, rec: Record) -> None:
        rec[self.dst] = float(np.max(np.abs(rec[self.src]["data"])))


class FailWhen:
    """map that raises for shots divisible by ``mod``."""

    def __init__(self, mod: int) -> None:
        self.mod = mod
        self.__name__ = f"fail_mod{mod}"

    def __call__(self, rec: Record) -> None:
        if rec.shot % self.mod == 0:
            raise ValueError(f"shot {rec.shot} is divisible by {self.mod}")
        rec.setdefault("survived", 0)
        rec["survived"] += 1


class ShotModNot:
    """where: shot % mod != rem."""

    def __init__(self, mod: int, rem: int) -> None:
        self.mod, self.rem = mod, rem
        self.__name__ = f"mod{mod}_not_{rem}"

    def __call__(self, rec: Record) -> bool:
        return rec.shot % self.mod != self.rem


class RaiseWhere:
    """where that raises for shots divisible by ``mod`` (else keeps)."""

    def __init__(self, mod: int) -> None:
        self.mod = mod
        self.__name__ = f"raise_mod{mod}"

    def __call__(self, rec: Record) -> bool:
        if rec.shot % self.mod == 0:
            raise ZeroDivisionError(f"predicate failed on {rec.shot}")
        return True


def case_example(shots) -> Pipeline:
    """The TokSearch example's shape, with a synthetic signal that misses every 7th shot."""
    p = Pipeline(shots)
    p.fetch("ipmhd", SyntheticSignal("ipmhd", n=30, missing_every=7))
    p.map(MaxAbs("ipmhd", "max_ipmhd"))
    p.keep(["max_ipmhd"])
    return p


def case_closure() -> Pipeline:
    """A map defined inside a function, closing over a local: it must be shipped to the workers."""
    import numpy as np

    scale = 2.5
    p = Pipeline(range(10))
    p.fetch("ip", SyntheticSignal("ip", n=10))

    @p.map
    def scaled_peak(rec):
        rec["peak"] = scale * np.max(np.abs(rec["ip"]["data"]))

    p.keep(["peak"])
    return p


def case_everything(shots) -> Pipeline:
    """Every kind of step, with failures of each kind."""
    p = Pipeline(shots)
    p.fetch("ip", SyntheticSignal("ip", n=12, missing_every=5))
    p.fetch_dataset("ds", {"a": SyntheticSignal("a", n=6), "b": SyntheticSignal("b", n=4, t_end=3000.0, missing_every=4)})
    p.map(SetField("x", 3))
    p.where(ShotModNot(3, 1))
    p.map(FailWhen(4))
    p.where(RaiseWhere(11))
    p.map(MaxAbs("ip", "peak"))
    p.discard(["ip"])
    return p


def case_dicts(shots) -> Pipeline:
    """A source of dicts with extra fields, keep() of a field that is sometimes absent."""
    p = Pipeline([{"shot": s, "tag": f"t{s % 4}", "weight": s / 2} for s in shots])
    p.map(SetField("y", -1))
    p.where(ShotModNot(2, 0))
    p.keep(["tag", "y", "nonexistent"])
    return p


def ratio_mean(rec: Record) -> None:
    """map on an aligned dataset: peak bt over peak ip on the common time base."""
    ds = rec["ds"]
    rec["ratio"] = float(ds["bt"].max() / ds["ip"].max())


def has_bt(rec: Record) -> bool:
    return "bt" in rec["ds"].data_vars


def case_dataset_align(shots) -> Pipeline:
    """TokSearch users' shape: fetch_dataset of signals on different time bases, align, map, where, align again."""
    p = Pipeline(shots)
    p.fetch_dataset("ds", {"ip": SyntheticSignal("ip", n=40),
                           "bt": SyntheticSignal("bt", n=25, t_end=4800.0, units="T", seed=3, missing_every=6)})
    p.align("ds", "ip", method="linear")
    p.where(has_bt)
    p.map(ratio_mean)
    p.fetch_dataset("ds", {"ne": SyntheticSignal("ne", n=10, seed=5)})
    p.align("ds", 500.0, method="pad")
    return p


FIXED_CASES: Dict[str, Callable[[Any], Pipeline]] = {
    "example": case_example,
    "everything": case_everything,
    "dicts": case_dicts,
    "dataset_align": case_dataset_align,
}


class RecordingSignal(Signal):
    """Counts gather/cleanup_shot/cleanup calls (serial backend only: the counts stay in this process)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []

    def gather(self, shot: int) -> Dict[str, Any]:
        self.calls.append(("gather", shot))
        return {"data": np.arange(3.0) * shot, "times": np.arange(3.0), "units": {"data": "V", "times": "s"}}

    def cleanup_shot(self, shot: int) -> None:
        self.calls.append(("cleanup_shot", shot))

    def cleanup(self) -> None:
        self.calls.append(("cleanup",))


# --------------------------------------------------------------------------- Record


def test_record_is_a_dict_with_shot_and_errors():
    rec = Record(165920)
    assert isinstance(rec, dict)
    assert rec.shot == rec["shot"] == 165920
    assert rec.errors == rec["errors"] == {}
    rec["x"] = 1
    assert dict(rec) == {"shot": 165920, "errors": {}, "x": 1}


@pytest.mark.parametrize("value,expected", [(np.int64(5), 5), ("7", 7), (8.0, 8), (True and 9, 9)])
def test_record_shot_coercion(value, expected):
    assert Record(value).shot == expected


@pytest.mark.parametrize("value", [1.5, "abc", None, [1]])
def test_record_rejects_bad_shots(value):
    with pytest.raises(InvalidShotNumber):
        Record(value)


def test_record_protects_shot_and_errors():
    rec = Record(1, {"a": 1, "b": 2})
    for key in ("shot", "errors"):
        with pytest.raises(ProtectedFieldError):
            del rec[key]
        assert rec.pop(key) is None and key in rec  # TokSearch: pop of shot/errors/key does nothing
    with pytest.raises(ProtectedFieldError):
        rec.popitem()
    rec.keep(["a"])
    assert set(rec) == {"shot", "errors", "a"}
    rec.discard(["a", "shot", "errors", "missing"])
    assert set(rec) == {"shot", "errors"}
    rec["z"] = 1
    rec.clear()
    assert set(rec) == {"shot", "errors"}


def test_record_from_dict():
    rec = Record.from_dict({"shot": "12", "a": 1})
    assert rec.shot == 12 and rec["a"] == 1 and rec.errors == {}
    with pytest.raises(MissingShotNumber):
        Record.from_dict({"a": 1})
    for reserved in ("key", "errors"):  # TokSearch's reserved source fields
        with pytest.raises(InvalidRecordField, match=reserved):
            Record.from_dict({"shot": 1, reserved: {}})
        with pytest.raises(InvalidRecordField):
            Pipeline([{"shot": 1, reserved: 2}])
    # A Record (e.g. from a ResultSet) keeps its errors as the source of a new pipeline.
    old = Record(5, {"errors": {"x": {"label": "x"}}})
    assert Pipeline([old]).compute_serial()[0].errors == {"x": {"label": "x"}}


def test_record_set_error_never_overwrites():
    rec = Record(1)
    for _ in range(3):
        try:
            raise KeyError("boom")
        except KeyError as exc:
            rec.set_error("f", exc)
    assert list(rec.errors) == ["f", "f_1", "f_2"]
    info = rec.errors["f_1"]  # TokSearch's entry: label, type (str of the class), traceback
    assert info["label"] == "f_1" and info["type"] == "<class 'KeyError'>"
    assert "boom" in info["message"] and info["traceback"].startswith("Traceback") and "KeyError: 'boom'" in info["traceback"]


def test_record_pickles_and_copies_deeply():
    rec = Record(3, {"arr": np.arange(3)})
    rec.set_error("x", ValueError("v"))
    for clone in (pickle.loads(pickle.dumps(rec)), copy.deepcopy(rec)):
        assert type(clone) is Record and deep_equal(dict(clone), dict(rec))
        clone["arr"][0] = 99
        clone.errors.clear()
        assert rec["arr"][0] == 0 and rec.errors


# --------------------------------------------------------------------------- Pipeline semantics


def test_documented_example_shape_serial():
    p = Pipeline(range(165920, 165940))
    sig = SyntheticSignal("ipmhd")
    p.fetch("ipmhd", sig)

    @p.map
    def calc_max_ipmhd(rec):
        rec["max_ipmhd"] = np.max(np.abs(rec["ipmhd"]["data"]))

    p.keep(["max_ipmhd"])
    results = p.compute_serial()
    assert len(results) == 20
    assert [r.shot for r in results] == list(range(165920, 165940))
    first = results[0]
    assert set(first) == {"shot", "errors", "max_ipmhd"}
    assert first["max_ipmhd"] == np.max(np.abs(sig.gather(165920)["data"]))
    assert callable(calc_max_ipmhd)  # the decorator gives the function back


def test_steps_are_lazy_and_source_is_untouched():
    src = [Record(1, {"v": [1]}), Record(2, {"v": [2]})]
    p = Pipeline(src)
    calls = []

    def mutate(rec):
        calls.append(rec.shot)
        rec["v"].append(0)

    p.map(mutate)
    assert calls == []  # nothing runs until compute
    p.compute_serial()
    p.compute_serial()
    assert calls == [1, 2, 1, 2]
    assert [r["v"] for r in src] == [[1], [2]]


def test_failing_fetch_leaves_none_and_error():
    p = Pipeline([1, 2, 3])
    p.fetch("sig", SyntheticSignal("sig", missing_every=2))
    r = p.compute_serial()
    assert r[1]["sig"] is None
    assert r[1].errors["sig"]["type"] == "<class 'toksearch_launch.signals.local.SignalNotFound'>"
    assert "shot 2" in r[1].errors["sig"]["message"]
    assert r[0]["sig"] is not None and r[0].errors == {}


def test_failing_map_records_function_name_and_run_continues():
    p = Pipeline(range(1, 7))
    p.map(FailWhen(3))

    def after(rec):
        rec["after"] = True

    p.map(after)
    r = p.compute_serial()
    assert len(r) == 6
    assert set(r[2].errors) == {"fail_mod3"} and r[2].errors["fail_mod3"]["type"] == "<class 'ValueError'>"
    assert all(rec["after"] for rec in r)  # later steps still run on a record with an error
    assert r.num_errors == 2 and [x.shot for x in r.records_with_errors] == [3, 6]


def test_where_filters_and_counts_raising_predicates():
    p = Pipeline(range(30))
    p.where(ShotModNot(2, 0))  # drops evens
    p.where(RaiseWhere(5))  # raises on 5, 15, 25
    with pytest.warns(RuntimeWarning, match="3 record"):
        r = p.compute_serial()
    assert [x.shot for x in r] == [s for s in range(30) if s % 2 and s % 5]
    assert r.stats.filtered == 15
    assert r.stats.where_errors == 3
    assert r.stats.where_error_shots == [5, 15, 25]
    shot, info = r.stats.where_error_details[0]
    assert shot == 5 and info["type"] == "<class 'ZeroDivisionError'>" and "raise_mod5" in info["step"]


def test_keep_and_discard_never_remove_shot_or_errors():
    p = Pipeline([{"shot": 1, "a": 1, "b": 2, "c": 3}])
    p.keep(["a", "b"])
    p.discard(["b", "shot", "errors"])
    rec = p.compute_serial()[0]
    assert dict(rec) == {"shot": 1, "errors": {}, "a": 1}
    p2 = Pipeline([{"shot": 1, "a": 1}])
    p2.keep("a")  # a single name is accepted
    assert set(p2.compute_serial()[0]) == {"shot", "errors", "a"}


def test_sources():
    base = Pipeline([3, 1, 2])
    base.map(SetField("x", 2))
    rs = base.compute_serial()
    assert [r["x"] for r in Pipeline(rs).compute_serial()] == [6, 2, 4]  # from a ResultSet
    cont = Pipeline(base)  # continues base's steps
    cont.map(SetField("y", 1))
    assert [(r["x"], r["y"]) for r in cont.compute_serial()] == [(6, 3), (2, 1), (4, 2)]
    assert len(base.operations) == 1  # the parent is not extended
    assert [r.shot for r in Pipeline(np.array([5, 6])).compute_serial()] == [5, 6]
    assert Pipeline([]).compute_serial().records == []
    with pytest.raises(TypeError):
        Pipeline("165920")
    with pytest.raises(TypeError):
        Pipeline(165920)  # type: ignore[arg-type]
    with pytest.raises(InvalidShotNumber):
        Pipeline([1.5])


def test_duplicate_shots_are_separate_records():
    p = Pipeline([4, 4, 4])
    p.map(SetField("x", 1))
    assert [r["x"] for r in p.compute_serial()] == [4, 4, 4]


def test_fetch_dataset_is_an_xarray_dataset_on_shared_dims():
    import xarray as xr

    p = Pipeline([10, 14])
    a = SyntheticSignal("a", n=5, t_end=400.0)  # times 0,100,...,400
    b = SyntheticSignal("b", n=3, t_end=400.0, units="T", missing_every=7)  # times 0,200,400
    p.fetch_dataset("ds", {"a": a, "b": b})
    r = p.compute_serial()
    ds = r[0]["ds"]
    assert isinstance(ds, xr.Dataset)
    assert ds["shot"].values.tolist() == [10] and ds.sizes["shot"] == 1  # TokSearch's shot coordinate
    np.testing.assert_array_equal(ds["times"].values, [0, 100, 200, 300, 400])
    np.testing.assert_array_equal(ds["a"].values, a.gather(10)["data"])
    want_b = np.full(5, np.nan)
    want_b[[0, 2, 4]] = b.gather(10)["data"]  # outer join: NaN where b has no sample
    np.testing.assert_array_equal(ds["b"].values, want_b)
    assert (ds["a"].attrs["units"], ds["b"].attrs["units"], ds["times"].attrs["units"]) == ("A", "T", "ms")
    assert ds["a"].dims == ("times",)
    # 14 % 7 == 0: b fails, a is still there; the error is filed under the dataset's name.
    ds14 = r[1]["ds"]
    assert "b" not in ds14 and "a" in ds14
    assert set(r[1].errors) == {"ds"} and "SignalNotFound" in r[1].errors["ds"]["type"]


def test_fetch_dataset_append_and_all_failing():
    p = Pipeline([3, 5])
    p.fetch_dataset("ds", {"a": SyntheticSignal("a", n=3, missing_every=5)})
    p.fetch_dataset("ds", {"c": SyntheticSignal("c", n=3)})
    r = p.compute_serial()
    assert {"a", "c"} <= set(r[0]["ds"].data_vars) and "times" in r[0]["ds"].coords
    assert "a" not in r[1]["ds"] and "c" in r[1]["ds"]
    q = Pipeline([5])
    q.fetch_dataset("ds", {"a": SyntheticSignal("a", missing_every=5)})
    rec = q.compute_serial()[0]
    assert list(rec["ds"].data_vars) == [] and set(rec.errors) == {"ds"}  # an empty dataset, as TokSearch
    replace = Pipeline([3])
    replace.fetch_dataset("ds", {"a": SyntheticSignal("a", n=3)})
    replace.fetch_dataset("ds", {"c": SyntheticSignal("c", n=3)}, append=False)
    assert list(replace.compute_serial()[0]["ds"].data_vars) == ["c"]


def test_dataset_align_case_values():
    """The values the cross-backend comparisons rest on, checked against numpy directly."""
    ip, bt = SyntheticSignal("ip", n=40), SyntheticSignal("bt", n=25, t_end=4800.0, units="T", seed=3)
    got = case_dataset_align([7, 12]).compute_serial()
    assert [r.shot for r in got] == [7]  # 12 % 6 == 0: bt missing, dropped by the where
    t, t_bt, d_bt = ip.gather(7)["times"], bt.gather(7)["times"], bt.gather(7)["data"]
    p = Pipeline([7])
    p.fetch_dataset("ds", {"ip": ip, "bt": bt})
    p.align("ds", "ip", method="linear")
    aligned = p.compute_shot(7)["ds"]
    np.testing.assert_array_equal(aligned["times"].values, t)
    inside = t <= 4800.0  # linear interpolation inside bt's range, extrapolation (last two samples) past it
    np.testing.assert_allclose(aligned["bt"].values[inside], np.interp(t[inside], t_bt, d_bt))
    slope = (d_bt[-1] - d_bt[-2]) / (t_bt[-1] - t_bt[-2])
    np.testing.assert_allclose(aligned["bt"].values[~inside], d_bt[-1] + slope * (t[~inside] - t_bt[-1]))
    assert got[0]["ratio"] == pytest.approx(float(aligned["bt"].max() / aligned["ip"].max()))
    final = got[0]["ds"]
    np.testing.assert_allclose(final["times"].values, np.arange(0.0, 5000.0, 500.0))
    assert set(final.data_vars) == {"ip", "bt", "ne"} and final["bt"].attrs["units"] == "T"


def test_fetch_dataset_multidim():
    p = Pipeline([2])
    te = SyntheticSignal("te", dims=("times", "channels"), n=4, extra_dim_size=2)
    ne = SyntheticSignal("ne", dims=("times", "channels"), data_order=("channels", "times"), n=4, extra_dim_size=3)
    p.fetch_dataset("prof", {"te": te, "ne": ne})
    ds = p.compute_serial()[0]["prof"]
    assert ds["te"].dims == ("times", "channels") and ds["ne"].dims == ("channels", "times")
    assert ds["te"].shape == (4, 3) and ds["ne"].shape == (3, 4)
    assert np.isnan(ds["te"].values[:, 2]).all()
    np.testing.assert_array_equal(ds["te"].values[:, :2], te.gather(2)["data"])
    np.testing.assert_array_equal(ds["ne"].values, ne.gather(2)["data"])


def test_signals_are_cleaned_up_per_shot_and_per_partition():
    sig = RecordingSignal()
    p = Pipeline([1, 2])
    p.fetch("a", sig)
    p.fetch("b", sig)  # the same signal twice: cleaned once per shot
    p.compute_serial()
    assert sig.calls == [
        ("gather", 1), ("gather", 1), ("cleanup_shot", 1),
        ("gather", 2), ("gather", 2), ("cleanup_shot", 2),
        ("cleanup",),
    ]


def test_compute_record_and_shot():
    p = case_everything([])
    rec = p.compute_shot(2)
    assert rec is not None and rec["x"] == 6 and rec.shot == 2
    assert p.compute_shot(1) is None  # 1 % 3 == 1: filtered
    assert p.compute_record({"shot": 8, "extra": 1})["extra"] == 1


def test_step_arguments_are_checked_when_added():
    p = Pipeline([1])
    with pytest.raises(TypeError):
        p.fetch("x", object())
    with pytest.raises(TypeError):
        p.map(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        p.where("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        p.fetch_dataset("x", {})


# --------------------------------------------------------------------------- ResultSet


def test_result_set_api():
    p = Pipeline(range(5))
    p.map(SetField("x", 1))
    rs = p.compute_serial()
    assert len(rs) == 5 and rs[-1].shot == 4
    assert type(rs[1:3]) is list and [r.shot for r in rs[1:3]] == [1, 2]  # a slice is a list, as in TokSearch
    assert [r.shot for r in rs] == list(range(5))
    plain = rs.to_list()
    assert plain[2] == {"shot": 2, "errors": {}, "x": 2} and type(plain[2]) is dict
    assert rs.info["backend"] == "serial" and rs.nodes == []
    assert "5 records" in repr(rs)


def test_to_dataframe():
    import importlib.util

    rs = Pipeline([1, 2]).compute_serial()
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pandas"):
            rs.to_dataframe()
    else:
        df = rs.to_dataframe()
        assert list(df["shot"]) == [1, 2]


# --------------------------------------------------------------------------- partitioning and output


def test_split_evenly_keeps_order_and_balances():
    items = list(range(10))
    chunks = split_evenly(items, 4)
    assert [len(c) for c in chunks] == [3, 3, 2, 2]
    assert sum(chunks, []) == items
    assert split_evenly(items, 50) == [[i] for i in items]
    assert split_evenly([], 4) == []
    assert median_size(chunks) == 2 and median_size([[1]] * 3) == 1


def test_default_numparts_reads_the_job_config(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKSEARCH_CONFIG", raising=False)
    assert default_numparts(2) == 8  # outside a job: 4 per CPU
    cfg = tmp_path / "toksearch.yaml"
    cfg.write_text("backend:\n  partitions_per_cpu: 3\n")
    monkeypatch.setenv("TOKSEARCH_CONFIG", str(cfg))
    assert default_numparts(5) == 15


def test_verbose_summary_lines():
    p = case_example(range(100))
    out = io.StringIO()
    with redirect_stdout(out):
        p.compute_multiprocessing(num_workers=2, batch_size=30, verbose=True)
    text = out.getvalue()
    assert "BATCH 1/1" in text
    assert "NUM CPUS: 2" in text
    assert "NUM PARTITIONS: 4" in text
    assert "MEDIAN PARTITION SIZE: 25" in text  # 100 records in 4 tasks of 30, 30, 30, 10 -> even split 25


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    p = case_example(range(20))

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    p.compute_serial(verbose=True)
    assert "rec/s" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    p.compute_serial(verbose=True)
    shown = fake.getvalue()
    assert "20/20" in shown and "errors=3" in shown  # shots 0, 7 and 14 are missing
    p.compute_serial(verbose=False)
    assert fake.getvalue() == shown  # verbose=False: no display even on a terminal


# --------------------------------------------------------------------------- multiprocessing


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_multiprocessing_matches_serial(name):
    shots = list(range(165920, 165980))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # case "everything" has a raising where()
        want = FIXED_CASES[name](shots).compute_serial()
        for batch_size in ("auto", 1, 7):
            got = FIXED_CASES[name](shots).compute_multiprocessing(num_workers=2, batch_size=batch_size)
            assert_same_results(got, want)


def test_multiprocessing_pickles_closures_and_lambdas():
    offset = 17
    p = Pipeline(range(10))

    @p.map
    def add(rec):
        rec["v"] = rec.shot + offset

    p.where(lambda rec: rec["v"] % 2 == 0)
    assert [r["v"] for r in p.compute_multiprocessing(num_workers=2, batch_size=3)] == [18, 20, 22, 24, 26]


def test_multiprocessing_arguments():
    p = Pipeline(range(4))
    with pytest.raises(ValueError):
        p.compute_multiprocessing(num_workers=0)
    with pytest.raises(ValueError):
        p.compute_multiprocessing(batch_size="big")
    assert len(Pipeline([]).compute_multiprocessing()) == 0
    rs = p.compute_multiprocessing(num_workers=1, start_method="spawn")
    assert [r.shot for r in rs] == [0, 1, 2, 3]


@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_compute_uses_the_jobs_default_backend(tmp_path, monkeypatch, backend):
    """`backend=spark` on the launcher's command line makes Pipeline.compute() use Spark."""
    from omegaconf import OmegaConf

    from toksearch_launch.config import CONFIG_ENV, default_config

    cfg = default_config()
    cfg.backend.name = backend
    path = tmp_path / "toksearch.yaml"
    OmegaConf.save(cfg, path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    called = []
    monkeypatch.setattr(Pipeline, "compute_ray", lambda self, **kw: called.append(("ray", kw)))
    monkeypatch.setattr(Pipeline, "compute_spark", lambda self, **kw: called.append(("spark", kw)))
    Pipeline([1, 2]).compute(numparts=3)
    assert called == [(backend, {"numparts": 3})]
