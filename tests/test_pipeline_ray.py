"""compute_ray on a local Ray: same records as serial, TokSearch's summary, partitioning, lifecycle.

Ray is started once for the module (2 CPUs, like CI); compute_ray must attach to it
and leave it running.
"""

from __future__ import annotations

import io
import sys
import os
import warnings
from contextlib import redirect_stdout

import pytest

from test_pipeline import FIXED_CASES, assert_same_results, case_closure, case_dataset_align, case_example

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.cluster

#: Ray ships the driver script's directory to its workers, not pytest's sys.path:
#: this lets them import the test modules that define the steps.
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}}


def test_starts_and_stops_its_own_local_ray():
    """Runs before the module fixture starts Ray: compute_ray inits a local Ray and shuts it down."""
    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    rs = case_example(range(50)).compute_ray(verbose=False, num_cpus=1, runtime_env=RUNTIME_ENV)
    assert len(rs) == 50 and rs.info["num_cpus"] == 1
    assert not ray.is_initialized()


def test_toksearch_ray_init_kwargs_dict_is_honoured_without_a_job_cluster(monkeypatch):
    """TokSearch's compute_ray(ray_init_kwargs={...}): the dict reaches ray.init of the local Ray."""
    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    monkeypatch.delenv("TOKSEARCH_CONFIG", raising=False)
    from toksearch_launch.backend.ray import RayRecordSet

    p = case_dataset_align(list(range(30)))
    rs = p.compute_ray(verbose=False, ray_init_kwargs={"num_cpus": 1, "runtime_env": RUNTIME_ENV})
    assert isinstance(rs, RayRecordSet) and rs.info["num_cpus"] == 1 and rs.info["connection"] == "local"
    assert_same_results(rs, p.compute_serial())
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray():
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, runtime_env=RUNTIME_ENV)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_ray_matches_serial(local_ray, name):
    shots = list(range(165920, 166020))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = FIXED_CASES[name](shots).compute_serial()
        for kwargs in ({}, {"numparts": 3, "batch_size": 40}, {"numparts": len(shots)}):
            got = FIXED_CASES[name](shots).compute_ray(verbose=False, **kwargs)
            assert_same_results(got, want)
    assert ray.is_initialized()  # not ours: left running


def test_default_partitioning_and_summary(local_ray):
    out = io.StringIO()
    with redirect_stdout(out):
        rs = case_example(range(1000)).compute_ray()
    text = out.getvalue()
    assert "BATCH 1/1" in text
    assert "NUM CPUS: 2" in text
    assert "NUM PARTITIONS: 8" in text  # 4 per CPU, not one per record
    assert "MEDIAN PARTITION SIZE: 125" in text
    assert rs.nodes and all(isinstance(n, str) for n in rs.nodes)


def test_batches_bound_each_round(local_ray):
    out = io.StringIO()
    with redirect_stdout(out):
        rs = case_example(range(100)).compute_ray(batch_size=30, numparts=2)
    text = out.getvalue()
    assert [line for line in text.splitlines() if line.startswith("BATCH")] == [
        "BATCH 1/4", "BATCH 2/4", "BATCH 3/4", "BATCH 4/4"]
    assert text.count("MEDIAN PARTITION SIZE: 15") == 3 and "MEDIAN PARTITION SIZE: 5" in text
    assert [r.shot for r in rs] == list(range(100))
    assert rs.info["num_partitions"] == 8 and rs.info["num_batches"] == 4


def test_memory_per_shot_is_accepted(local_ray):
    rs = case_example(range(20)).compute_ray(verbose=False, memory_per_shot=1024 * 1024)
    assert len(rs) == 20


def test_closures_reach_the_workers(local_ray):
    p = case_closure()
    assert_same_results(p.compute_ray(verbose=False), p.compute_serial())


def test_progress_display_on_a_terminal(local_ray, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    with redirect_stdout(io.StringIO()):
        rs = case_example(range(700)).compute_ray()
    shown = fake.getvalue()
    assert "700/700" in shown and f"errors={rs.num_errors}" in shown and "rec/s" in shown


def test_init_kwargs_are_ignored_loudly_when_ray_runs(local_ray):
    with pytest.warns(RuntimeWarning, match="num_cpus"):
        rs = case_example(range(5)).compute_ray(verbose=False, num_cpus=7)
    assert rs.info["num_cpus"] == 2


def test_compute_long_form_and_placement_group(local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group

    from toksearch_launch.backend.ray import RayConfig, RayRecordSet

    p = case_dataset_align(list(range(40)))
    want = p.compute_serial()
    groups = []

    def make_group():
        groups.append(placement_group([{"CPU": 1}]))
        return groups[-1]

    got = p.compute(RayRecordSet, RayConfig(numparts=3, verbose=False, placement_group_func=make_group))
    assert isinstance(got, RayRecordSet) and got.info["num_partitions"] == 3 and len(groups) == 1
    assert_same_results(got, want)
    remove_placement_group(groups[0])
    ids = got.object_ids()  # TokSearch's: the records as ObjectRefs
    assert [r.shot for r in ray.get(ids)] == [r.shot for r in want]


def test_cleanup_closes_a_connection_the_user_made(local_ray):
    """Last in the module: TokSearch's results.cleanup() shuts down the user's Ray; the records stay."""
    rs = case_example(range(10)).compute_ray(verbose=False)
    assert rs.info["connection"] == "user" and ray.is_initialized()
    rs.cleanup()
    assert not ray.is_initialized() and len(rs) == 10 and rs[3].shot == 3
