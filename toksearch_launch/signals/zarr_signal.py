"""One signal from per-shot zarr stores (TokSearch's ``ZarrSignal``), read with the zarr package.

A shot's store is ``<path>/<file_name_format.format(shot=shot)>`` (default
``{shot}.zarr``); ``treepath`` names the array inside it, ``group/name`` or just
``name``. The array's own dimension names (zarr v3 ``dimension_names``, or the
``_ARRAY_DIMENSIONS`` attribute xarray writes in zarr v2 stores) are matched in order
to ``dims``: ``dims[i]`` gets the values of the array named like the array's i-th
dimension, when the group has one. Units come from each array's ``units`` attribute
(TokSearch drops the dims' units; they are returned here).

``path`` may be a local directory, ``file://...``, or, with ``fs`` (an fsspec
filesystem), any location that filesystem reads.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from toksearch_launch.signals.base import Signal


class ZarrSignalError(KeyError):
    """The store, group or array a ZarrSignal names is not there."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ZarrSignal(Signal):
    """``treepath`` of the zarr store of each shot under ``path``."""

    def __init__(
        self,
        path: str | os.PathLike,
        treepath: str,
        dims: Optional[Sequence[str]] = ("times",),
        fetch_units: bool = True,
        file_name_format: str = "{shot}.zarr",
        fs: Any = None,
    ) -> None:
        super().__init__(dims=dims, fetch_units=fetch_units)
        self.path = os.fspath(path)
        self.treepath = treepath.strip("/")
        self.file_name_format = file_name_format
        self.fs = fs

    def store_location(self, shot: int) -> str:
        """Where the shot's store is (a local path, or a path for ``fs``)."""
        location = f"{self.path.rstrip('/')}/{self.file_name_format.format(shot=int(shot))}"
        if self.fs is None and location.startswith("file://"):
            location = location[len("file://"):]
        return location

    def _open_group(self, shot: int) -> Any:
        import zarr

        location = self.store_location(shot)
        group_path, _ = _split(self.treepath)
        if self.fs is not None:
            from zarr.storage import FsspecStore

            fs = self.fs
            if not getattr(fs, "async_impl", False):
                from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

                fs = AsyncFileSystemWrapper(fs, asynchronous=True)
            store: Any = FsspecStore(fs, path=location.split("://", 1)[-1], read_only=True)
        else:
            if not os.path.exists(location):
                raise ZarrSignalError(f"ZarrSignal {self.treepath!r}: no store for shot {shot} at {location}")
            store = location
        try:
            root = zarr.open_group(store, mode="r")
        except Exception as exc:
            raise ZarrSignalError(f"ZarrSignal {self.treepath!r}: cannot open the store of shot {shot} at {location}: {exc}") from exc
        if not group_path:
            return root
        try:
            return root[group_path]
        except KeyError:
            raise ZarrSignalError(f"ZarrSignal {self.treepath!r}: shot {shot}: no group {group_path!r} in {location}") from None

    def gather(self, shot: int) -> Dict[str, Any]:
        import numpy as np

        group = self._open_group(shot)
        _, name = _split(self.treepath)
        try:
            array = group[name]
        except KeyError:
            raise ZarrSignalError(
                f"ZarrSignal {self.treepath!r}: shot {shot}: no array {name!r} (has: {', '.join(sorted(group.array_keys()))})"
            ) from None
        out: Dict[str, Any] = {"data": np.asarray(array[...])}
        units = {"data": _units(array)}
        for new_name, stored in zip(self.dims, _dimension_names(array)):
            if stored and stored in group:
                coord = group[stored]
                out[new_name] = np.asarray(coord[...])
                units[new_name] = _units(coord)
        if self.fetch_units:
            out["units"] = units
        return out

    def __repr__(self) -> str:
        return f"ZarrSignal({self.path!r}, {self.treepath!r}, dims={self.dims!r})"


def _split(treepath: str) -> Tuple[str, str]:
    """(group path, array name) of ``group/sub/name``."""
    group, _, name = treepath.rpartition("/")
    return group, name


def _dimension_names(array: Any) -> Tuple[Optional[str], ...]:
    """The array's dim names: zarr v3 metadata, else xarray's v2 attribute, else none."""
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if names:
        return tuple(names)
    return tuple(array.attrs.get("_ARRAY_DIMENSIONS", ()))


def _units(array: Any) -> str:
    value = array.attrs.get("units", "")
    return value.decode() if isinstance(value, bytes) else str(value)
