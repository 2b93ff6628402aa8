"""Property: for any pipeline and input, multiprocessing gives exactly serial's records and counts.

Ray and Spark run the same per-partition function; they are checked on fixed
cases in test_pipeline_ray.py / test_pipeline_spark.py.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_pipeline import FailWhen, MaxAbs, RaiseWhere, SetField, ShotModNot, assert_same_results, deep_equal
from toksearch_launch import Pipeline, Record
from toksearch_launch.signals import SyntheticSignal

FIELDS = ["a", "b", "c", "x", "y"]

shots = st.integers(min_value=0, max_value=60)
mods = st.integers(min_value=2, max_value=7)
fields = st.sampled_from(FIELDS)

steps = st.one_of(
    st.tuples(st.just("fetch"), fields, st.one_of(st.none(), mods), st.integers(1, 6)),
    st.tuples(st.just("fetch_dataset"), fields, st.one_of(st.none(), mods), st.integers(1, 6), st.integers(1, 6)),
    st.tuples(st.just("set"), fields, st.integers(-3, 3)),
    st.tuples(st.just("max"), fields, fields),
    st.tuples(st.just("fail"), mods),
    st.tuples(st.just("where"), mods, st.integers(0, 6)),
    st.tuples(st.just("where_raise"), mods),
    st.tuples(st.just("keep"), st.lists(fields, max_size=3)),
    st.tuples(st.just("discard"), st.lists(fields, max_size=3)),
)


@st.composite
def sources(draw) -> List[Any]:
    """Shot numbers, dicts with extra fields, or Records that already carry data and errors."""
    kind = draw(st.sampled_from(["int", "dict", "record"]))
    numbers = draw(st.lists(shots, max_size=25))
    if kind == "int":
        return numbers
    if kind == "dict":
        return [{"shot": s, "tag": s % 3, "a": float(s)} for s in numbers]
    out = []
    for s in numbers:
        rec = Record(s, {"b": [s, s]})
        if s % 4 == 0:
            rec.errors["earlier"] = {"type": "X", "message": "from a previous run", "traceback": ""}
        out.append(rec)
    return out


def build(source: List[Any], spec: List[Tuple]) -> Pipeline:
    p = Pipeline(source)
    for step in spec:
        kind = step[0]
        if kind == "fetch":
            _, name, missing, n = step
            p.fetch(name, SyntheticSignal(name, n=n, missing_every=missing))
        elif kind == "fetch_dataset":
            _, name, missing, n1, n2 = step
            p.fetch_dataset(name, {"p": SyntheticSignal("p", n=n1, t_end=100.0),
                                   "q": SyntheticSignal("q", n=n2, t_end=100.0, missing_every=missing)})
        elif kind == "set":
            p.map(SetField(step[1], step[2]))
        elif kind == "max":
            p.map(MaxAbs(step[1], step[2]))
        elif kind == "fail":
            p.map(FailWhen(step[1]))
        elif kind == "where":
            p.where(ShotModNot(step[1], step[2]))
        elif kind == "where_raise":
            p.where(RaiseWhere(step[1]))
        elif kind == "keep":
            p.keep(step[1])
        else:
            p.discard(step[1])
    return p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=sources(), spec=st.lists(steps, max_size=7), batch_size=st.integers(1, 6), workers=st.integers(1, 3))
def test_multiprocessing_equals_serial(source, spec, batch_size, workers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = build(source, spec).compute_serial()
        got = build(source, spec).compute_multiprocessing(num_workers=workers, batch_size=batch_size)
    assert_same_results(got, want)
    # Whatever the steps: input order, shot and errors always present.
    in_order = [s["shot"] if isinstance(s, dict) else s for s in source]  # a Record is a dict
    out_shots = [r.shot for r in want]
    it = iter(in_order)
    assert all(any(s == t for t in it) for s in out_shots), "output is not a subsequence of the input"
    assert all({"shot", "errors"} <= set(r) for r in want)
    assert want.stats.records_in == len(source)
    assert want.stats.records_out + want.stats.filtered + want.stats.where_errors == len(source)


@settings(max_examples=30, deadline=None)
@given(source=sources(), spec=st.lists(steps, max_size=6))
def test_compute_record_equals_serial_run(source, spec):
    """compute_record (debugging one shot) gives what the full run gives for that shot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = build(source, spec)
        run = p.compute_serial()
        singles = [p.compute_record(s) for s in source]
    kept = [r for r in singles if r is not None]
    assert len(kept) == len(run)
    assert all(deep_equal(dict(a), dict(b)) for a, b in zip(kept, run))
