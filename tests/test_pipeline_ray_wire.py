"""Unit tests of what compute_ray sends between a Ray task and the driver, and of its GC guards
(no Ray needed: these are the pure pieces; tests/test_pipeline_ray.py runs them on a real Ray)."""

from __future__ import annotations

import gc

import pytest

from toksearch_launch.pipeline.ops import Map, RunStats, Where, records_from_wire, run_partition, run_partition_wire
from toksearch_launch.pipeline.ray_backend import gc_paused, young_objects_collected
from toksearch_launch.pipeline.record import Record


def test_run_stats_cross_the_wire_unchanged() -> None:
    stats = RunStats(records_in=5, records_out=2, filtered=1, where_errors=2, where_error_shots=[3, 4],
                     where_error_details=[(3, {"message": "boom", "step": "where(f)"}), (4, {"message": "bang"})],
                     records_with_errors=1)
    wire = stats.to_wire()
    assert all(type(x) in (int, list) for x in wire)  # msgpack-able without pickle: no tuples, no RunStats
    assert RunStats.from_wire(wire) == stats


def test_wire_records_equal_the_serial_ones() -> None:
    def double(rec):
        rec["y"] = rec["shot"] * 2
        if rec["shot"] == 3:
            raise ValueError("three")

    def odd(rec):
        if rec["shot"] == 5:
            raise KeyError("five")
        return rec["shot"] % 2

    ops = [Map(double), Where(odd)]
    serial, serial_stats = run_partition(ops, list(range(1, 9)))
    rows, wire_stats = run_partition_wire(ops, list(range(1, 9)))
    back = records_from_wire(rows)
    assert all(type(r) is dict for r in rows) and all(type(r) is Record for r in back)
    assert back == serial and [r.errors for r in back] == [r.errors for r in serial]
    assert RunStats.from_wire(wire_stats.to_wire()) == serial_stats
    assert serial_stats.records_with_errors == 1 and serial_stats.where_errors == 1 and serial_stats.filtered == 4


@pytest.mark.parametrize("guard", [gc_paused, young_objects_collected])
def test_gc_guards_give_the_collector_back_as_it_was(guard) -> None:
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with guard():
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), guard():
        raise RuntimeError("a failed partition")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_young_objects_collected_leaves_a_frozen_or_disabled_collector_alone() -> None:
    gc.disable()
    try:
        with young_objects_collected():
            assert gc.get_freeze_count() == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with young_objects_collected():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_cyclic_garbage_made_during_a_partition_is_still_collected() -> None:
    class Node:
        pass

    with young_objects_collected():
        a, b = Node(), Node()
        a.other, b.other = b, a
        ident = id(a)
        del a, b
        gc.collect()
        assert all(id(o) != ident for o in gc.get_objects())
