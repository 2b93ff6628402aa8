"""TokSearch's ``toksearch.pipeline.dataset``: small helpers on a record's xarray Dataset."""

from __future__ import annotations

from typing import Any, Iterable


def merge_val(ds: Any, name: str, val: Any) -> Any:
    """``ds`` with ``val`` (any array-like, a scalar too) added as variable ``name``."""
    import xarray as xr

    return xr.merge([ds, xr.DataArray(val).to_dataset(name=name)], join="outer", compat="no_conflicts",
                    combine_attrs="override")


def keep(ds: Any, keys: Iterable[str]) -> Any:
    """Only the data variables in ``keys`` (names that do not exist are ignored)."""
    wanted = set(keys)
    return ds.drop_vars([k for k in ds.data_vars if k not in wanted])


def discard(ds: Any, keys: Iterable[str]) -> Any:
    """Without the data variables in ``keys``."""
    return ds.drop_vars(list(keys))
