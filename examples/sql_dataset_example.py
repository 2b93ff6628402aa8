"""A TokSearch user's script, in the shape of GA-FDP/example_toksearch_scripts, on local data.

Shots come from an SQL query (``Pipeline.from_sql``), signals are fetched as one
xarray Dataset per shot (``fetch_dataset``) and put on a common time base
(``align``), a ``map`` computes flat-top numbers, a ``where`` keeps the big shots,
and the results are written to one netCDF file. Only the data is local: the shot
table is a small sqlite database the script creates (D3D users query d3drdb with
``connect_d3drdb()``), and the signals are an HDF5 archive (``FileSignal``) plus a
computed one (``SyntheticSignal``) instead of MDSplus.

    python examples/sql_dataset_example.py serial
    toksearch_submit site=local nodes=2 python examples/sql_dataset_example.py -- ray
    toksearch_submit site=local nodes=2 python examples/sql_dataset_example.py -- spark

Files go to ``--workdir`` (default: the job's run directory, which every node of the
job can read, else a per-user temp dir): ``shots.db``, ``signals.h5`` and
``results.nc`` (or ``--out``).
"""

import argparse
import getpass
import os
import sqlite3
import sys
import tempfile

import numpy as np
import xarray as xr

from toksearch_launch import Pipeline
from toksearch_launch.signals import FileSignal, SyntheticSignal
from toksearch_launch.signals.local import ensure_demo_archive

BACKENDS = ("ray", "spark", "serial", "multiprocessing")
FIRST_SHOT = 180000
#: The common time base every shot's dataset is aligned to (ms).
TIMEBASE = np.arange(0.0, 5000.0, 20.0)


def make_shot_table(path, first_shot, count):
    """A tiny d3drdb look-alike: shots_type (every 5th shot is a test shot) and summaries."""
    if os.path.exists(path):
        os.unlink(path)
    conn = sqlite3.connect(path)
    conn.execute("create table shots_type (shot integer primary key, shot_type text)")
    conn.execute("create table summaries (shot integer primary key, t_ip_flat real, ip_flat_duration real)")
    shots = range(first_shot, first_shot + count)
    conn.executemany("insert into shots_type values (?, ?)",
                     [(s, "test" if s % 5 == 0 else "plasma") for s in shots])
    conn.executemany("insert into summaries values (?, ?, ?)",
                     [(s, 1000.0 + (s % 7) * 50.0, 2000.0 + (s % 3) * 100.0) for s in shots])
    conn.commit()
    return conn


def make_signals(archive, first_shot, count):
    """ip and bt from an HDF5 archive (written on first use), ne computed on its own time base."""
    path = ensure_demo_archive(archive, first_shot, count, ["ip", "bt"])
    return {
        "ip": FileSignal("ip", path),
        "bt": FileSignal("bt", path),
        "ne": SyntheticSignal("ne", n=60, seed=7, units="m^-3"),
    }


def create_pipeline(conn, signals):
    query = """
        select st.shot, su.t_ip_flat, su.ip_flat_duration
        from shots_type st join summaries su on st.shot = su.shot
        where st.shot_type = ? and su.ip_flat_duration > ?
        order by st.shot
    """
    pipeline = Pipeline.from_sql(conn, query, "plasma", 2050.0)
    pipeline.fetch_dataset("ds", signals)
    pipeline.align("ds", TIMEBASE, method="linear")

    @pipeline.map
    def flattop(rec):
        ds = rec["ds"]
        start, end = rec["t_ip_flat"], rec["t_ip_flat"] + rec["ip_flat_duration"]
        flat = ds.where((ds.times >= start) & (ds.times <= end), drop=True)
        rec["ip_flat_mean"] = float(flat["ip"].mean())
        rec["bt_flat_max"] = float(np.abs(flat["bt"]).max())
        rec["ne_flat_mean"] = float(flat["ne"].mean())

    @pipeline.where
    def big_shots(rec):
        return rec["ip_flat_mean"] > 1.0e6

    pipeline.keep(["ds", "ip_flat_mean", "bt_flat_max", "ne_flat_mean"])
    return pipeline


def results_dataset(results):
    """One Dataset for all shots: the aligned signals on (shot, times), the scalars on shot."""
    if not len(results):
        return xr.Dataset()
    combined = xr.concat([rec["ds"] for rec in results], dim="shot", join="outer", data_vars="all")
    for name in ("ip_flat_mean", "bt_flat_max", "ne_flat_mean"):
        combined[name] = ("shot", np.array([rec[name] for rec in results]))
    return combined


def default_workdir():
    run_dir = os.environ.get("TOKSEARCH_RUN_DIR")
    if run_dir:
        return run_dir
    path = os.path.join(tempfile.gettempdir(), f"toksearch-sql-example-{getpass.getuser()}")
    os.makedirs(path, exist_ok=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="from_sql + fetch_dataset + align, results to netCDF")
    parser.add_argument("backend", choices=BACKENDS)
    parser.add_argument("--count", type=int, default=400, help="shots in the table (default 400)")
    parser.add_argument("--workdir", default=None, help="where the database, archive and results go")
    parser.add_argument("--out", default=None, help="netCDF file (default WORKDIR/results.nc)")
    args = parser.parse_args(argv)

    workdir = args.workdir or default_workdir()
    conn = make_shot_table(os.path.join(workdir, "shots.db"), FIRST_SHOT, args.count)
    signals = make_signals(os.path.join(workdir, "signals.h5"), FIRST_SHOT, args.count)
    pipeline = create_pipeline(conn, signals)
    conn.close()
    print(f"Query selected {len(pipeline)} shots")

    if args.backend == "ray":
        results = pipeline.compute_ray()
    elif args.backend == "spark":
        results = pipeline.compute_spark()
    elif args.backend == "multiprocessing":
        results = pipeline.compute_multiprocessing()
    else:
        results = pipeline.compute_serial()

    print(f"Got {len(results)} results using {args.backend}")
    print(f"Records with errors: {sum(1 for rec in results if rec.errors)}")
    out = args.out or os.path.join(workdir, "results.nc")
    results_dataset(results).to_netcdf(out)
    print(f"Wrote {out}")
    if args.backend in ("ray", "spark"):
        print(f"Cluster nodes: {','.join(results.nodes)}")
    return 0 if len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
