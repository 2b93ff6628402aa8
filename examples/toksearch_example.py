"""TokSearch's documented example, running on toksearch_launch.

``create_pipeline`` and the compute calls are TokSearch's own (with its missing
``import numpy as np`` added); only the import line differs. Options added so it
runs without an MDSplus server:

    python examples/toksearch_example.py --source synthetic ray
    python examples/toksearch_example.py --source file spark      # HDF5 demo archive
    python examples/toksearch_example.py --source synthetic dask
    toksearch_submit site=local nodes=2 python examples/toksearch_example.py --source synthetic -- ray

``--source``: ``mds`` (TokSearch's, needs a server), ``file`` (FileSignal on a
demo archive, written on first use), ``synthetic`` (SyntheticSignal, computed).
The archive defaults to ``$TOKSEARCH_RUN_DIR/toksearch_demo.h5`` inside a
toksearch_submit job (the run dir is where every node can read it) and to
``<tmp>/toksearch_demo-<user>.h5`` outside one; ``--archive`` overrides it.

Exit status 1 if every record failed (e.g. ``--source mds`` with no server).
"""

import argparse
import getpass
import json
import os
import sys
import tempfile

import numpy as np

from toksearch_launch import MdsSignal, Pipeline

BACKENDS = ("ray", "spark", "dask", "serial", "multiprocessing")


def create_pipeline(shots, ipmhd_signal=None):
    if ipmhd_signal is None:
        ipmhd_signal = MdsSignal(r"\ipmhd", "efit01")
    pipeline = Pipeline(shots)
    pipeline.fetch("ipmhd", ipmhd_signal)

    @pipeline.map
    def calc_max_ipmhd(rec):
        rec["max_ipmhd"] = np.max(np.abs(rec["ipmhd"]["data"]))

    pipeline.keep(["max_ipmhd"])
    return pipeline


def default_archive() -> str:
    """The run dir inside a job (shared by the job's nodes), else a per-user temp file."""
    run_dir = os.environ.get("TOKSEARCH_RUN_DIR")
    if run_dir:
        return os.path.join(run_dir, "toksearch_demo.h5")
    return os.path.join(tempfile.gettempdir(), f"toksearch_demo-{getpass.getuser()}.h5")


def make_signal(args: argparse.Namespace):
    """The ipmhd signal for ``--source``; None means TokSearch's MdsSignal."""
    if args.source == "mds":
        return None
    if args.source == "synthetic":
        from toksearch_launch import SyntheticSignal

        return SyntheticSignal("ipmhd", latency=args.latency)
    from toksearch_launch import FileSignal
    from toksearch_launch.signals.local import ensure_demo_archive

    path = ensure_demo_archive(args.archive or default_archive(), args.first_shot, args.count, ["ipmhd"])
    return FileSignal("ipmhd", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="TokSearch example: max |ipmhd| of every shot.")
    parser.add_argument("backend", choices=BACKENDS, help="where to compute")
    parser.add_argument("--source", choices=("mds", "file", "synthetic"), default="mds",
                        help="where ipmhd comes from (default mds, as in TokSearch)")
    parser.add_argument("--archive", default=None, help="HDF5 demo archive for --source file")
    parser.add_argument("--count", type=int, default=10000, help="number of shots (default 10000)")
    parser.add_argument("--first-shot", type=int, default=165920)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds slept per fetch by --source synthetic (imitates a server)")
    parser.add_argument("--output", default=None, help="write [shot, max_ipmhd, error names] per record as JSON")
    args = parser.parse_args(argv)

    backend = args.backend
    shots = range(args.first_shot, args.first_shot + args.count)
    pipeline = create_pipeline(shots, make_signal(args))

    if backend == "ray":
        results = pipeline.compute_ray()
    elif backend == "spark":
        results = pipeline.compute_spark()
    elif backend == "dask":
        results = pipeline.compute_dask()
    elif backend == "multiprocessing":
        results = pipeline.compute_multiprocessing()
    else:
        results = pipeline.compute_serial()

    print(f"Got {len(results)} results using {backend}")
    failed = [rec for rec in results if rec.errors]
    print(f"Records with errors: {len(failed)}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump([[rec.shot, rec.get("max_ipmhd"), sorted(rec.errors)] for rec in results], fh)
    if backend in ("ray", "spark", "dask"):
        print(f"Cluster nodes: {','.join(results.nodes)}")
    if results and len(failed) == len(results):
        name, err = next(iter(failed[0].errors.items()))
        print(f"Every record failed; shot {failed[0].shot}, {name}: {err['type']}: {err['message']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
