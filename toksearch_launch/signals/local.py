"""Signals that need no MDSplus server, so anyone can run (and test) a pipeline anywhere.

* :class:`SyntheticSignal`: data computed from (shot, name, seed): a smooth plasma
  current waveform, with optional per-fetch latency to imitate a remote server
  and optional missing shots.
* :class:`FileSignal`: one HDF5 file of per-shot arrays, ``/<shot>/<name>/data``
  and ``/<shot>/<name>/<dim>``, units in the ``units`` attribute of each.
* ``python -m toksearch_launch.signals.local make-demo PATH ...`` writes such a
  file from the synthetic signal (so the two give identical data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from toksearch_launch.signals.base import Signal

#: Value of the root ``format`` attribute of a demo archive.
DEMO_FORMAT = "toksearch_launch-demo-1"


class SignalNotFound(KeyError):
    """The signal has no data for this shot (what a missing MDSplus node looks like)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SyntheticSignal(Signal):
    """A deterministic fake signal: same (shot, name, seed) -> same arrays, in any process.

    ``n`` samples over ``t_end`` ms on the first dim; any further dim has
    ``extra_dim_size`` points. ``latency`` seconds are slept per fetch.
    Shots divisible by ``missing_every`` raise :class:`SignalNotFound`.
    """

    def __init__(
        self,
        name: str,
        n: int = 200,
        latency: float = 0.0,
        dims: Sequence[str] = ("times",),
        seed: int = 0,
        missing_every: Optional[int] = None,
        data_order: Optional[Sequence[str]] = None,
        fetch_units: bool = True,
        t_end: float = 5000.0,
        extra_dim_size: int = 3,
        units: str = "A",
    ) -> None:
        super().__init__(dims=dims, data_order=data_order, fetch_units=fetch_units)
        if n < 1:
            raise ValueError("n must be 1 or more")
        if missing_every is not None and missing_every < 1:
            raise ValueError("missing_every must be 1 or more (or None)")
        if sorted(self.data_order) != sorted(self.dims):
            raise ValueError(f"data_order {self.data_order} must name the same dims as {self.dims}")
        self.name = name
        self.n = int(n)
        self.latency = float(latency)
        self.seed = int(seed)
        self.missing_every = missing_every
        self.t_end = float(t_end)
        self.extra_dim_size = int(extra_dim_size)
        self.units = units
        self._t = np.linspace(0.0, self.t_end, self.n)  # shared by every shot

    def is_missing(self, shot: int) -> bool:
        return bool(self.missing_every) and shot % self.missing_every == 0

    def coords(self) -> Dict[str, np.ndarray]:
        """The dim arrays (the same for every shot)."""
        out = {}
        for i, d in enumerate(self.dims):
            out[d] = self._t.copy() if i == 0 else np.arange(self.extra_dim_size, dtype=float)
        return out

    def waveform(self, shot: int) -> np.ndarray:
        """A plasma-current-like trace: ramp up, flat top with ripple, ramp down (A)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, zlib.crc32(self.name.encode()), shot % 2**32, (shot // 2**32) % 2**32])
        flat, ramp_up, end, ramp_down, ripple, freq, phase = rng.uniform(
            [0.8e6, 300.0, 3000.0, 300.0, 0.002, 2.0, 0.0],
            [1.6e6, 800.0, 4400.0, 500.0, 0.02, 8.0, 2 * np.pi],
        )
        t = self._t
        up = np.clip(t / ramp_up, 0.0, 1.0)
        down = np.clip((end + ramp_down - t) / ramp_down, 0.0, 1.0)
        envelope = up * up * (3 - 2 * up) * down * down * (3 - 2 * down)  # smoothstep ramps
        return flat * envelope * (1.0 + ripple * np.sin(2 * np.pi * freq * t / 1000.0 + phase))

    def gather(self, shot: int) -> Dict[str, Any]:
        if self.latency > 0:
            time.sleep(self.latency)
        if self.is_missing(shot):
            raise SignalNotFound(f"{self.name}: no data for shot {shot} (synthetic: every {self.missing_every}th shot is missing)")
        coords = self.coords()
        data = self.waveform(shot)
        for k in range(1, len(self.dims)):  # extra dims: scaled copies of the trace
            scale = 1.0 + 0.1 * np.arange(self.extra_dim_size)
            data = data[..., None] * scale.reshape((1,) * k + (-1,))
        axes = [self.dims.index(d) for d in self.data_order]
        out: Dict[str, Any] = {"data": np.transpose(data, axes) if axes != sorted(axes) else data}
        out.update(coords)
        if self.fetch_units:
            out["units"] = {"data": self.units, **{d: ("ms" if i == 0 else "") for i, d in enumerate(self.dims)}}
        return out

    def __repr__(self) -> str:
        extra = f", latency={self.latency}" if self.latency else ""
        extra += f", missing_every={self.missing_every}" if self.missing_every else ""
        return f"SyntheticSignal({self.name!r}, n={self.n}, seed={self.seed}{extra})"


class MockSignal(Signal):
    """Fixed arrays for every shot (TokSearch's test signal): ``data`` and ``times``, default ``arange(4)``.

    Units are ``A`` for the data and ``ms`` for ``times``; with ``dims=None`` only
    the data comes back.
    """

    default_d = np.arange(4)
    default_t = np.arange(4)

    def __init__(self, data: Any = None, times: Any = None, dims: Optional[Sequence[str]] = ("times",),
                 with_units: bool = True) -> None:
        super().__init__(dims=dims, fetch_units=with_units)
        self.data = self.default_d if data is None else data
        self.times = self.default_t if times is None else times

    def gather(self, shot: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"data": self.data}
        for d in self.dims:
            out[d] = self.times
        if self.with_units:
            out["units"] = {"data": "A", **{d: "ms" for d in self.dims}}
        return out


class FileSignal(Signal):
    """Arrays of one signal from an HDF5 file: ``/<shot>/<name>/data`` and one dataset per dim.

    The file is opened lazily in each process that fetches and closed by
    :meth:`cleanup`; the open handle is never pickled.
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        dims: Sequence[str] = ("times",),
        data_order: Optional[Sequence[str]] = None,
        fetch_units: bool = True,
    ) -> None:
        super().__init__(dims=dims, data_order=data_order, fetch_units=fetch_units)
        self.name = name
        self.path = os.path.abspath(os.fspath(path))
        self._h5: Any = None
        self._pid: Optional[int] = None

    def _file(self) -> Any:
        """The open file; reopened after a fork (an HDF5 handle must not cross processes)."""
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            try:
                # Shared filesystems (NFS, Lustre) often refuse HDF5's file locks; reads need none.
                self._h5 = h5py.File(self.path, "r", locking=False)
            except TypeError:  # h5py built against an HDF5 without the option
                self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def gather(self, shot: int) -> Dict[str, Any]:
        f = self._file()
        key = f"{int(shot)}/{self.name}"
        if key not in f:
            raise SignalNotFound(f"{self.name}: no data for shot {shot} in {self.path}")
        group = f[key]
        out: Dict[str, Any] = {"data": group["data"][()]}
        for d in self.dims:
            out[d] = group[d][()]
        if self.fetch_units:
            units = {"data": _as_str(group["data"].attrs.get("units", ""))}
            for d in self.dims:
                units[d] = _as_str(group[d].attrs.get("units", ""))
            out["units"] = units
        return out

    def cleanup(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            try:
                self._h5.close()
            except Exception:
                pass
        self._h5 = None
        self._pid = None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"FileSignal({self.name!r}, {self.path!r}, dims={self.dims!r})"


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- demo archive


def write_demo_archive(
    path: str | os.PathLike,
    first_shot: int = 165920,
    count: int = 10000,
    signals: Iterable[str] = ("ipmhd",),
    n: int = 200,
    seed: int = 0,
    missing_every: Optional[int] = None,
) -> str:
    """Write SyntheticSignal data of ``count`` shots to an HDF5 file FileSignal reads.

    Written to a temporary file and renamed, so a reader never sees half a file.
    Shots the synthetic signal treats as missing are left out. The time base is
    the same for every shot, so it is stored once and hard-linked.
    """
    import h5py

    path = os.path.abspath(os.fspath(path))
    names = list(dict.fromkeys(signals))
    if not names:
        raise ValueError("at least one signal name is needed")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # Not mkstemp: its 0600 mode would keep the archive from the job's other users/tools.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs.update(
                {
                    "format": DEMO_FORMAT,
                    "first_shot": int(first_shot),
                    "count": int(count),
                    "signals": json.dumps(names),
                    "samples": int(n),
                    "seed": int(seed),
                    "missing_every": int(missing_every or 0),
                }
            )
            sigs = [SyntheticSignal(name, n=n, seed=seed, missing_every=missing_every) for name in names]
            times = f.create_dataset("_shared/times", data=sigs[0].coords()["times"])
            times.attrs["units"] = "ms"
            for shot in range(int(first_shot), int(first_shot) + int(count)):
                for sig in sigs:
                    if sig.is_missing(shot):
                        continue
                    group = f.create_group(f"{shot}/{sig.name}")
                    data = group.create_dataset("data", data=sig.waveform(shot))
                    data.attrs["units"] = sig.units
                    group["times"] = times  # hard link: one copy of the time base
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def demo_archive_covers(
    path: str | os.PathLike,
    first_shot: int,
    count: int,
    signals: Iterable[str],
    n: int = 200,
    seed: int = 0,
    missing_every: Optional[int] = None,
) -> bool:
    """True if ``path`` is a demo archive written with these settings for at least these shots."""
    if not os.path.exists(path):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if _as_str(a.get("format", "")) != DEMO_FORMAT:
                return False
            have = set(json.loads(_as_str(a["signals"])))
            start, have_count = int(a["first_shot"]), int(a["count"])
            return (
                set(signals) <= have
                and start <= first_shot
                and first_shot + count <= start + have_count
                and int(a["samples"]) == n
                and int(a["seed"]) == seed
                and int(a["missing_every"]) == int(missing_every or 0)
            )
    except (OSError, KeyError, ValueError):
        return False


def ensure_demo_archive(
    path: str | os.PathLike,
    first_shot: int = 165920,
    count: int = 10000,
    signals: Iterable[str] = ("ipmhd",),
    n: int = 200,
    seed: int = 0,
    missing_every: Optional[int] = None,
) -> str:
    """Reuse ``path`` if it already holds these shots, else (re)write it."""
    names = list(signals)
    if demo_archive_covers(path, first_shot, count, names, n, seed, missing_every):
        return os.path.abspath(os.fspath(path))
    return write_demo_archive(path, first_shot, count, names, n, seed, missing_every)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toksearch_launch.signals.local",
        description="Local signal utilities (no MDSplus server needed).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write an HDF5 demo archive that FileSignal reads")
    demo.add_argument("path", help="HDF5 file to write (replaced if it exists)")
    demo.add_argument("--shots", type=int, default=165920, help="first shot number (default 165920)")
    demo.add_argument("--count", type=int, default=10000, help="number of consecutive shots (default 10000)")
    demo.add_argument(
        "--signal", action="append", dest="signals", metavar="NAME",
        help="signal name, repeatable (default: ipmhd)",
    )
    demo.add_argument("--samples", type=int, default=200, help="samples per trace (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--missing-every", type=int, default=None, metavar="N", help="leave out shots divisible by N")
    args = parser.parse_args(argv)

    if args.count < 0 or args.samples < 1:
        parser.error("--count must be >= 0 and --samples >= 1")
    start = time.perf_counter()
    names = args.signals or ["ipmhd"]
    path = write_demo_archive(args.path, args.shots, args.count, names, args.samples, args.seed, args.missing_every)
    print(
        f"wrote {args.count} shots x {len(names)} signal(s) ({', '.join(names)}) to {path} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
