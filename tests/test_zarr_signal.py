"""ZarrSignal on real zarr stores written by the tests (with xarray, and with zarr directly)."""

from __future__ import annotations

import numpy as np
import pytest

from toksearch_launch import Pipeline, ZarrSignal
from toksearch_launch.signals.zarr_signal import ZarrSignalError


def write_xarray_store(path, shot, group="magnetics", n=50, fmt="{shot}.zarr"):
    """What a user's converter writes: a dataset with ``ip`` on a ``time`` dim, units as attrs."""
    import xarray as xr

    time = np.linspace(0.0, 1.0, n)
    ip = np.sin(time * 3) * shot
    ds = xr.Dataset({"ip": ("time", ip, {"units": "A"})}, coords={"time": ("time", time, {"units": "s"})})
    ds.to_zarr(str(path / fmt.format(shot=shot)), group=group, mode="w", consolidated=False)
    return time, ip


def test_zarr_signal_reads_an_xarray_written_store(tmp_path):
    time, ip = write_xarray_store(tmp_path, 30421)
    sig = ZarrSignal(tmp_path, "magnetics/ip")
    res = sig.fetch(30421)
    np.testing.assert_array_equal(res["data"], ip)
    np.testing.assert_array_equal(res["times"], time)  # the store's `time` dim becomes dims[0]
    assert res["units"] == {"data": "A", "times": "s"}
    arr = sig.fetch_as_xarray(30421)
    assert arr.dims == ("times",) and arr.attrs["units"] == "A" and arr["times"].attrs["units"] == "s"


def test_zarr_signal_no_group_custom_name_and_file_url(tmp_path):
    write_xarray_store(tmp_path, 30422, group=None)
    _, ip = write_xarray_store(tmp_path, 30423, fmt="MAST{shot}.zarr")
    np.testing.assert_array_equal(ZarrSignal(tmp_path, "ip").fetch(30422)["data"], write_xarray_store(tmp_path, 30422, group=None)[1])
    sig = ZarrSignal(f"file://{tmp_path}", "magnetics/ip", file_name_format="MAST{shot}.zarr", fetch_units=False)
    res = sig.fetch(30423)
    np.testing.assert_array_equal(res["data"], ip) and "units" not in res
    assert "units" not in res


def test_zarr_signal_with_an_fsspec_filesystem(tmp_path):
    import fsspec

    _, ip = write_xarray_store(tmp_path, 7)
    sig = ZarrSignal(f"file://{tmp_path}", "magnetics/ip", fs=fsspec.filesystem("file"))
    np.testing.assert_array_equal(sig.fetch(7)["data"], ip)


def test_zarr_signal_2d_store_written_with_zarr(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "9.zarr"), mode="w")
    prof = root.create_group("profiles")
    t = np.arange(4.0)
    rho = np.linspace(0, 1, 3)
    te = np.arange(12.0).reshape(4, 3)
    kwargs = {"dimension_names": ("time", "rho")} if zarr.__version__ >= "3" else {}
    a = prof.create_array("te", shape=te.shape, dtype="f8", **kwargs) if hasattr(prof, "create_array") else prof.zeros("te", shape=te.shape)
    a[...] = te
    a.attrs["units"] = "eV"
    if not kwargs:
        a.attrs["_ARRAY_DIMENSIONS"] = ["time", "rho"]
    for name, values in (("time", t), ("rho", rho)):
        c = prof.create_array(name, shape=values.shape, dtype="f8", **({"dimension_names": (name,)} if kwargs else {})) \
            if hasattr(prof, "create_array") else prof.zeros(name, shape=values.shape)
        c[...] = values
    sig = ZarrSignal(tmp_path, "profiles/te", dims=("times", "rho"))
    res = sig.fetch(9)
    np.testing.assert_array_equal(res["data"], te)
    np.testing.assert_array_equal(res["times"], t)
    np.testing.assert_array_equal(res["rho"], rho)
    # In a pipeline: a dataset, a missing shot's error under the dataset's name.
    p = Pipeline([9, 10])
    p.fetch_dataset("ds", {"te": sig})
    got = p.compute_serial()
    np.testing.assert_array_equal(got[0]["ds"]["te"].values, te)
    assert set(got[1].errors) == {"ds"} and "no store for shot 10" in got[1].errors["ds"]["message"]


def test_zarr_signal_missing_array_is_one_line(tmp_path):
    write_xarray_store(tmp_path, 1)
    with pytest.raises(ZarrSignalError) as info:
        ZarrSignal(tmp_path, "magnetics/bt").fetch(1)
    assert str(info.value) == "ZarrSignal 'magnetics/bt': shot 1: no array 'bt' (has: ip, time)"
