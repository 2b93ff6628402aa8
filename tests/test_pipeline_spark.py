"""compute_spark on a local[2] Spark: same records as serial, TokSearch's summary, lifecycle.

One SparkSession serves the module; compute_spark must use it (given or active)
and leave it running.
"""

from __future__ import annotations

import io
import sys
import warnings
from contextlib import redirect_stdout

import pytest

from test_pipeline import FIXED_CASES, assert_same_results, case_closure, case_dataset_align, case_example

pyspark = pytest.importorskip("pyspark")

pytestmark = pytest.mark.cluster


def test_starts_and_stops_its_own_local_session():
    """Runs before the module fixture: compute_spark makes a local session and stops it."""
    from pyspark import SparkContext

    if SparkContext._active_spark_context is not None:
        pytest.skip("a SparkContext is already active in this process")
    rs = case_example(range(50)).compute_spark(verbose=False)
    assert len(rs) == 50 and rs.nodes == ["127.0.0.1"]
    assert SparkContext._active_spark_context is None


@pytest.fixture(scope="module")
def session():
    from toksearch_launch.pipeline.spark_backend import local_session

    spark = local_session(2)
    yield spark
    spark.stop()


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_spark_matches_serial(session, name):
    shots = list(range(165920, 166020))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = FIXED_CASES[name](shots).compute_serial()
        for kwargs in ({}, {"sc": session, "numparts": 3, "batch_size": 40}, {"sc": session.sparkContext, "numparts": 100}):
            got = FIXED_CASES[name](shots).compute_spark(verbose=False, **kwargs)
            assert_same_results(got, want)
    assert not session.sparkContext._jsc.sc().isStopped()  # not ours: left running


def test_default_partitioning_and_summary(session):
    out = io.StringIO()
    with redirect_stdout(out):
        rs = case_example(range(1000)).compute_spark()
    text = out.getvalue()
    assert "BATCH 1/1" in text
    assert "NUM CPUS: 2" in text
    assert "NUM PARTITIONS: 8" in text
    assert "MEDIAN PARTITION SIZE: 125" in text
    assert rs.info["backend"] == "spark" and rs.nodes == ["127.0.0.1"]


def test_closures_reach_the_workers(session):
    p = case_closure()
    assert_same_results(p.compute_spark(verbose=False), p.compute_serial())


def test_progress_display_on_a_terminal(session, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    with redirect_stdout(io.StringIO()):
        rs = case_example(range(700)).compute_spark()
    shown = fake.getvalue()
    assert "700/700" in shown and f"errors={rs.num_errors}" in shown and "rec/s" in shown


def test_compute_long_form(session):
    from toksearch_launch.backend.spark import SparkRecordSet, ToksearchSparkConfig

    p = case_dataset_align(list(range(40)))
    got = p.compute(SparkRecordSet, ToksearchSparkConfig(sc=session, numparts=3, cache=True), verbose=False)
    assert isinstance(got, SparkRecordSet) and got.info["num_partitions"] == 3 and got.info["connection"] == "user"
    assert_same_results(got, p.compute_serial())
    assert [r.shot for r in got.to_rdd().collect()] == [r.shot for r in got]  # TokSearch's to_rdd()


def test_cleanup_stops_a_context_the_user_made(session):
    """Last in the module: TokSearch's results.cleanup() stops the user's SparkContext; the records stay."""
    rs = case_example(range(10)).compute_spark(verbose=False)
    rs.cleanup()
    assert session.sparkContext._jsc is None or session.sparkContext._jsc.sc().isStopped()
    assert len(rs) == 10 and rs[3].shot == 3
