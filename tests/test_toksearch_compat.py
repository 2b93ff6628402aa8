"""TokSearch's public API as users' scripts use it: import paths, the Signal API and its
registry, align, records and result sets, compute()'s long form. Unit tests: no cluster."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from toksearch_launch import Pipeline, Record, Signal, SignalRegistry
from toksearch_launch.signals import MockSignal, SyntheticSignal

# Every `from toksearch... import name` a TokSearch script or test can write, with the package renamed.
TOKSEARCH_IMPORTS = {
    "toksearch_launch": ["Pipeline", "Record", "Signal", "MdsSignal", "MdsTreePath", "ZarrSignal", "SignalRegistry",
                         "XarrayAligner", "InvalidShotNumber", "InvalidRecordField", "MissingShotNumber",
                         "MissingColumnName", "RecordSet"],
    "toksearch_launch.signal": ["Signal"],
    "toksearch_launch.signal.signal": ["Signal", "SignalRegistry"],
    "toksearch_launch.signal.mds": ["MdsSignal", "MdsTreePath"],
    "toksearch_launch.signal.zarr": ["ZarrSignal"],
    "toksearch_launch.signal.mock_signal": ["MockSignal"],
    "toksearch_launch.record": ["Record", "InvalidShotNumber", "InvalidRecordField", "MissingShotNumber"],
    "toksearch_launch.record.record_set": ["RecordSet"],
    "toksearch_launch.pipeline": ["Pipeline"],
    "toksearch_launch.pipeline.record_pipeline": ["Pipeline", "MissingColumnName"],
    "toksearch_launch.pipeline.pipeline_source": ["PipelineSource"],
    "toksearch_launch.pipeline.align": ["XarrayAligner"],
    "toksearch_launch.pipeline.dataset": ["merge_val", "keep", "discard"],
    "toksearch_launch.backend.serial": ["SerialRecordSet"],
    "toksearch_launch.backend.multiprocessing": ["MultiprocessingRecordSet", "MultiprocessingConfig"],
    "toksearch_launch.backend.ray": ["RayRecordSet", "RayConfig"],
    "toksearch_launch.backend.spark": ["SparkRecordSet", "ToksearchSparkConfig"],
    "toksearch_launch.sql.mssql": ["connect_d3drdb"],
    "toksearch_launch.utilities.utilities": ["capture_exception", "chunk_it", "partition_it", "set_env", "unset_env"],
}


@pytest.mark.parametrize("module", sorted(TOKSEARCH_IMPORTS))
def test_toksearch_import_paths_resolve(module):
    mod = importlib.import_module(module)
    for name in TOKSEARCH_IMPORTS[module]:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_toksearch_imports_load_neither_ray_nor_pyspark_nor_xarray():
    lines = [f"from {m} import {', '.join(names)}" for m, names in TOKSEARCH_IMPORTS.items()]
    code = "\n".join(lines) + "\nimport sys; print(sorted(m for m in ('ray', 'pyspark', 'xarray', 'zarr', 'pymssql') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- Signal API


class Square(Signal):
    """A TokSearch-style subclass: no-argument super().__init__(), attributes set afterwards."""

    def __init__(self):
        super().__init__()
        self.with_units = False
        self.cleaned = []

    def gather(self, shot):
        t = np.arange(3.0)
        return {"data": t * shot, "times": t}

    def cleanup_shot(self, shot):
        self.cleaned.append(shot)

    def cleanup(self):
        self.cleaned.append("all")


def test_signal_fetch_callback_and_chaining():
    sig = Square().set_callback(lambda res: {**res, "data": res["data"] + 1})
    assert isinstance(sig, Square)
    np.testing.assert_array_equal(sig.fetch(2)["data"], [1, 3, 5])
    assert sig.fetch_units is False and "units" not in sig.fetch(2)
    p = Pipeline([3])
    p.fetch("sq", sig)  # the pipeline's fetch runs the callback too
    np.testing.assert_array_equal(p.compute_serial()[0]["sq"]["data"], [1, 4, 7])


def test_signal_set_dims_and_data_order_indices():
    sig = MockSignal().set_dims(("rho", "times"), data_order=(1, 0))
    assert sig.dims == ("rho", "times") and sig.data_order == ("times", "rho")
    with pytest.raises(ValueError, match="data_order index 5"):
        MockSignal().set_dims(("times",), data_order=(5,))


def test_signal_without_dims():
    sig = MockSignal(dims=None)
    res = sig.fetch(1)
    assert "times" not in res and res["units"] == {"data": "A"}
    arr = sig.fetch_as_xarray(1)
    assert arr.attrs["units"] == "A" and arr.shape == (4,)


def test_fetch_as_xarray_coords_and_units():
    sig = SyntheticSignal("te", dims=("times", "rho"), data_order=("rho", "times"), n=5, extra_dim_size=2, units="eV")
    arr = sig.fetch_as_xarray(7)
    assert arr.dims == ("rho", "times") and arr.shape == (2, 5)
    np.testing.assert_array_equal(arr["times"].values, sig.gather(7)["times"])
    np.testing.assert_array_equal(arr.values, sig.gather(7)["data"])
    assert arr.attrs["units"] == "eV" and arr["times"].attrs["units"] == "ms"


def test_signal_registry_is_per_process_and_cleans_up():
    reg = SignalRegistry()
    reg.reset()
    assert SignalRegistry() is reg
    a, b = Square(), Square()
    reg.register(a)
    reg.register(a)
    reg.register(b)
    assert a in reg and len(reg.signals) == 2
    reg.cleanup_shot(9)
    assert a.cleaned == [9] and a in reg
    reg.cleanup()
    assert a.cleaned == [9, "all"] and a not in reg and len(reg) == 0


def test_signals_fetched_inside_a_map_are_cleaned_up():
    inner = Square()

    def use_inner(rec):
        rec["v"] = inner.fetch(rec.shot)["data"].sum()

    p = Pipeline([1, 2])
    p.map(use_inner)
    got = p.compute_serial()
    assert [r["v"] for r in got] == [3.0, 6.0]
    assert inner.cleaned == [1, 2, "all"]  # per record, then per partition
    assert inner not in SignalRegistry()


# --------------------------------------------------------------------------- align


def two_signal_pipeline(shots=(1,)):
    t = np.arange(10.0)
    p = Pipeline(list(shots))
    p.fetch_dataset("ds", {"s1": MockSignal(t, t), "s2": MockSignal(t + 0.4, t + 0.4)})
    return p


@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_align_interpolates_onto_a_variable(method):
    p = two_signal_pipeline()
    p.align("ds", "s1", method=method)
    rec = p.compute_shot(1)
    ds = rec["ds"]
    assert rec.errors == {}
    np.testing.assert_array_equal(ds["times"].values, np.arange(10.0))
    np.testing.assert_allclose(ds["s2"].values, np.arange(10.0), atol=1e-9)  # s2 = t (extrapolated at 0)
    assert ds["s1"].attrs["units"] == "A" and ds["times"].attrs["units"] == "ms" and ds["shot"].values.tolist() == [1]


def test_align_pad_holds_values():
    p = two_signal_pipeline()
    p.align("ds", "s1")  # method="pad"
    ds = p.compute_shot(1)["ds"]
    # At t=k, the last s2 sample at or before k is k-1+0.4; at t=0 the back-fill gives 0.4.
    np.testing.assert_allclose(ds["s2"].values, [0.4] + [k - 0.6 for k in range(1, 10)])
    np.testing.assert_array_equal(ds["s1"].values, np.arange(10.0))


def test_align_with_array_list_callable_and_period():
    new = np.array([0.5, 2.5, 4.5])
    for align_with in (new, list(new), lambda ds: new, lambda ds, dim: new):
        p = two_signal_pipeline()
        p.align("ds", align_with, method="linear")
        ds = p.compute_shot(1)["ds"]
        np.testing.assert_allclose(ds["s1"].values, new)
    p = two_signal_pipeline()
    p.align("ds", 2.5)
    ds = p.compute_shot(1)["ds"]
    np.testing.assert_allclose(np.diff(ds["times"].values), 2.5)


def test_align_extrapolate_false_leaves_nan_outside():
    p = two_signal_pipeline()
    p.align("ds", [-1.0, 5.0, 20.0], method="linear", extrapolate=False)
    ds = p.compute_shot(1)["ds"]
    np.testing.assert_array_equal(np.isnan(ds["s1"].values), [True, False, True])


def test_align_keeps_variables_without_the_dim():
    from toksearch_launch.pipeline.dataset import merge_val

    p = two_signal_pipeline()

    def add_scalar(rec):
        rec["ds"] = merge_val(rec["ds"], "x", 1)

    p.map(add_scalar)
    p.align("ds", "s1", method="linear")
    rec = p.compute_shot(1)
    assert rec.errors == {} and int(rec["ds"]["x"]) == 1


def test_align_bad_input_is_one_clear_line():
    p = two_signal_pipeline()
    with pytest.raises(ValueError) as info:
        p.align("ds", "s1", method="spline")
    assert str(info.value).startswith("align: unknown method 'spline'; use one of: pad,")
    with pytest.raises(ValueError, match="align_with must be"):
        p.align("ds", {"bad": 1})
    q = Pipeline([1])
    q.align("nope", "s1")
    rec = q.compute_shot(1)
    assert set(rec.errors) == {"align"}
    assert rec.errors["align"]["message"] == (
        "align('nope'): the record has no dataset 'nope' (add fetch_dataset('nope', {...}) before align)")
    r = two_signal_pipeline()
    r.align("ds", "missing_var")
    assert "align_with='missing_var' is not a variable" in r.compute_shot(1).errors["align"]["message"]


# --------------------------------------------------------------------------- records and result sets


def test_error_entry_is_toksearchs():
    p = Pipeline([4])
    p.fetch("sig", SyntheticSignal("sig", missing_every=2))
    entry = p.compute_serial()[0].errors["sig"]
    assert set(entry) >= {"label", "type", "traceback"} and entry["label"] == "sig"
    assert entry["type"] == "<class 'toksearch_launch.signals.local.SignalNotFound'>"
    from toksearch_launch.utilities.utilities import capture_exception

    try:
        raise ValueError("x")
    except ValueError as exc:
        assert capture_exception("lab", exc)["type"] == "<class 'ValueError'>"


def test_result_set_classes_and_compute_long_form():
    from toksearch_launch.backend.multiprocessing import MultiprocessingConfig, MultiprocessingRecordSet
    from toksearch_launch.backend.serial import SerialRecordSet

    p = Pipeline(range(6))

    def double(rec):
        rec["d"] = rec.shot * 2

    p.map(double)
    serial = p.compute_serial()
    assert isinstance(serial, SerialRecordSet)
    mp = p.compute(MultiprocessingRecordSet, MultiprocessingConfig(num_workers=2, batch_size=2))
    assert isinstance(mp, MultiprocessingRecordSet) and [r["d"] for r in mp] == [r["d"] for r in serial]
    assert mp.info["batch_size"] == 2 and mp.info["num_cpus"] == 2
    assert [r["d"] for r in p.compute(SerialRecordSet)] == [0, 2, 4, 6, 8, 10]
    with pytest.raises(TypeError, match="is not one of"):
        p.compute(dict)
    serial.cleanup()  # nothing to release, records stay
    assert len(serial) == 6 and isinstance(serial[0], Record) and type(serial[1:3]) is list


def test_pipeline_source_and_continuation():
    from toksearch_launch.pipeline.pipeline_source import PipelineSource

    src = PipelineSource([{"shot": 1, "blah": 4}, 2, Record(3)])
    assert [r.shot for r in src.records] == [1, 2, 3] and src.records[0]["blah"] == 4
    p = Pipeline(src)

    def tag(rec):
        rec["t"] = 1

    p.map(tag)
    assert [r["t"] for r in p.compute_serial()] == [1, 1, 1]
    assert "t" not in src.records[0]  # the source is never changed
