"""Put every variable of a record's xarray Dataset on one coordinate (TokSearch's ``align``).

``XarrayAligner(align_with, dim, method, extrapolate, interp_kwargs)`` is what
``Pipeline.align`` runs on each record. ``align_with`` gives the new values of
``dim``: a variable name (that variable's non-NaN ``dim`` values), a list or array,
a callable ``f(ds)`` (or ``f(ds, dim)``), or a number (a sample period from the
first to the last ``dim`` value).

* ``pad`` (TokSearch's default): fill the NaNs the outer join left, forward then
  backward along ``dim``, then hold the last value before each new point
  (``reindex(method="pad")``); a new point before every sample stays NaN.
* interpolation methods (``linear``, ``cubic``, ...): per variable, drop its NaNs
  along ``dim``, then ``DataArray.interp`` (scipy); ``extrapolate=True`` extends
  past the ends (``fill_value="extrapolate"``), False leaves NaN there.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

#: Methods that hold a sample (xarray reindex); ``pad`` is TokSearch's default.
HOLD_METHODS = ("pad", "ffill", "backfill", "bfill", "nearest")
#: Methods that interpolate (xarray interp, which uses scipy).
INTERP_METHODS = ("linear", "zero", "slinear", "quadratic", "cubic", "pchip", "akima", "makima")
ALIGN_METHODS = HOLD_METHODS + INTERP_METHODS

AlignWith = Union[str, Sequence[float], Any, Callable[..., Any], float]


class AlignError(ValueError):
    """An align step that cannot work (unknown method, bad align_with, missing variable)."""


def _kind_of(align_with: Any) -> str:
    """How ``align_with`` names the new coordinate (checked once, when the step is added)."""
    import numpy as np

    if isinstance(align_with, str):
        return "variable"
    if isinstance(align_with, (list, tuple, range)):
        return "values"
    if isinstance(align_with, np.ndarray):
        return "values"
    if callable(align_with):
        return "callable"
    if isinstance(align_with, numbers.Real) and not isinstance(align_with, bool):
        if not align_with > 0:
            raise AlignError(f"align: a sample period must be positive, got {align_with!r}")
        return "period"
    raise AlignError(
        "align: align_with must be a variable name, a list or array of values, a callable or a "
        f"sample period; got {type(align_with).__name__}"
    )


def _accepts_two_args(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class XarrayAligner:
    """Aligns a Dataset along ``dim`` (see the module docstring); picklable, built once per pipeline."""

    def __init__(
        self,
        align_with: AlignWith,
        dim: str = "times",
        method: str = "pad",
        extrapolate: bool = True,
        interp_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        if method not in ALIGN_METHODS:
            raise AlignError(f"align: unknown method {method!r}; use one of: {', '.join(ALIGN_METHODS)}")
        self.kind = _kind_of(align_with)
        self.align_with = align_with
        self.dim = dim
        self.method = method
        self.extrapolate = bool(extrapolate)
        self.interp_kwargs = dict(interp_kwargs or {})
        if self.extrapolate:
            self.interp_kwargs.setdefault("fill_value", "extrapolate")

    def coords(self, ds: Any) -> Any:
        """The new values of ``dim`` for this dataset."""
        import numpy as np

        if self.kind == "values":
            return np.asarray(self.align_with)
        if self.kind == "callable":
            func = self.align_with
            return np.asarray(func(ds, self.dim) if _accepts_two_args(func) else func(ds))
        if self.dim not in ds.coords:
            raise AlignError(f"align: the dataset has no {self.dim!r} coordinate (dims: {', '.join(map(str, ds.dims))})")
        if self.kind == "period":
            values = ds[self.dim].values
            return np.arange(np.nanmin(values), np.nanmax(values), self.align_with)
        name = self.align_with
        if name not in ds.data_vars:
            raise AlignError(
                f"align: align_with={name!r} is not a variable of the dataset (variables: {', '.join(map(str, ds.data_vars))})"
            )
        return ds[name].dropna(self.dim)[self.dim].values

    def __call__(self, ds: Any) -> Any:
        if self.method in HOLD_METHODS:
            return self._hold(ds)
        return self._interpolate(ds)

    def _hold(self, ds: Any) -> Any:
        coords = self.coords(ds)
        filled = _fill_along(ds, self.dim)
        return filled.reindex({self.dim: coords}, method=self.method)

    def _interpolate(self, ds: Any) -> Any:
        import xarray as xr

        coords = self.coords(ds)
        method = self.method
        aligned: List[Any] = []
        untouched: Dict[str, Any] = {}
        for name, var in ds.data_vars.items():
            if self.dim not in var.dims:
                untouched[name] = var  # kept as is (TokSearch drops them)
                continue
            clean = var.dropna(self.dim)
            aligned.append(
                clean.interp({self.dim: coords}, method=method, kwargs=self.interp_kwargs).rename(name)
            )
        base = xr.Dataset(coords={k: v for k, v in ds.coords.items() if self.dim not in v.dims}, attrs=ds.attrs)
        out = xr.merge([base, *[a.to_dataset() for a in aligned], xr.Dataset(untouched)], join="outer", compat="override",
                       combine_attrs="override")
        if self.dim in ds.coords and ds[self.dim].attrs:
            out[self.dim].attrs.update(ds[self.dim].attrs)
        return out

    def __repr__(self) -> str:
        return f"XarrayAligner({self.align_with!r}, dim={self.dim!r}, method={self.method!r})"


def _fill_along(ds: Any, dim: str) -> Any:
    """Forward- then back-fill every variable that has ``dim`` (no bottleneck needed)."""
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if dim in var.dims and var.dtype.kind in "fc":
            out[name] = _ffill(_ffill(var, dim, reverse=False), dim, reverse=True)
    return out


def _ffill(var: Any, dim: str, reverse: bool) -> Any:
    """Carry the last valid value along ``dim`` (backwards if ``reverse``): numpy only."""
    import numpy as np

    axis = var.get_axis_num(dim)
    data = np.moveaxis(np.array(var.values, copy=True), axis, -1)
    if reverse:
        data = data[..., ::-1]
    valid = ~np.isnan(data)
    index = np.where(valid, np.arange(data.shape[-1]), 0)
    np.maximum.accumulate(index, axis=-1, out=index)
    filled = np.take_along_axis(data, index, axis=-1)
    filled[~np.maximum.accumulate(valid, axis=-1)] = np.nan  # before the first valid value
    if reverse:
        filled = filled[..., ::-1]
    return var.copy(data=np.moveaxis(filled, -1, axis))
