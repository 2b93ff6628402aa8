"""Unit tests of the node-loss line and of the rerun counting (toksearch_launch/pipeline/node_loss.py).

The engine is replaced by a node list the test changes and a clock it moves; the
driver's loop is the real ``in_flight`` with stand-in handles.
"""

from __future__ import annotations

from typing import Dict, List

import pytest

from toksearch_launch.pipeline.driver import in_flight
from toksearch_launch.pipeline.node_loss import NodeWatch, lost_node_line, node_name, spark_live_nodes, unique_names


class Engine:
    """A node list and a clock the test controls; every line said is kept."""

    def __init__(self, nodes: Dict[str, str]) -> None:
        self.nodes = dict(nodes)
        self.now = 0.0
        self.looks = 0
        self.lines: List[str] = []

    def live(self) -> Dict[str, str]:
        self.looks += 1
        return dict(self.nodes)

    def watch(self, **kwargs) -> NodeWatch:
        return NodeWatch("ray", self.live, say=self.lines.append, clock=lambda: self.now, **kwargs)


THREE = {"a": "tsn1", "b": "tsn2", "c": "tsn3"}


def test_the_line_names_the_node_the_engine_and_the_count():
    assert lost_node_line("tsn2", "ray", 3) == (
        "toksearch_launch: lost node tsn2 (ray) during compute_ray; 3 partitions rerun on the remaining nodes")
    assert lost_node_line("tsn3", "spark", 1).endswith("during compute_spark; 1 partition rerun on the remaining nodes")
    assert lost_node_line("tsn3", "dask", 0).endswith("; 0 partitions rerun on the remaining nodes")
    assert "an unknown number of partitions rerun" in lost_node_line("tsn2", "dask", None)


def test_node_names_resolve_addresses_and_keep_names():
    assert node_name("tsn2") == "tsn2"
    assert node_name("localhost") == "localhost"
    assert node_name("203.0.113.77") == "203.0.113.77"  # TEST-NET: no name, kept as it is
    # several nodes on one machine share its host name: the addresses tell them apart
    assert unique_names({"x": ("box", "127.0.0.2"), "y": ("box", "127.0.0.3"), "z": ("tsn3", "10.0.0.3")}) == {
        "x": "127.0.0.2", "y": "127.0.0.3", "z": "tsn3"}


def test_no_loss_says_nothing_and_looks_at_most_once_per_poll():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=2.0)
    assert engine.looks == 1  # the nodes at the start
    for step in range(10):  # 10 waits of 0.5 s: 5 s
        engine.now = step * 0.5
        watch.check({0, 1})
        watch.finished(step, 0)
    assert engine.looks == 1 + 2  # at 2.0 and 4.0 s
    watch.close()
    assert engine.lines == [] and watch.reported == []


def test_reruns_are_counted_once_the_partitions_in_flight_came_back():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    watch.finished(0, 0)
    del engine.nodes["b"]
    engine.now = 1.0
    watch.check({1, 2, 3, 4})  # tsn2 is gone while 1-4 are in flight
    assert engine.lines == []  # not before they came back: the count would be short
    watch.finished(2, 0)  # ran elsewhere
    watch.finished(1, 1)  # rerun
    watch.finished(5, 0)  # submitted after the loss
    watch.finished(4, 2)
    assert engine.lines == []
    watch.finished(3, 0)
    assert engine.lines == [lost_node_line("tsn2", "ray", 2)]
    watch.close()
    assert len(engine.lines) == 1  # one line per lost node


def test_a_rerun_back_before_the_loss_is_seen_counts_for_it():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    watch.finished(7, 1)  # the engine noticed the dead worker before our look
    del engine.nodes["c"]
    engine.now = 1.0
    watch.check({8})
    watch.finished(8, 1)
    assert engine.lines == [lost_node_line("tsn3", "ray", 2)]


def test_the_end_of_the_run_says_every_loss_not_yet_said():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    del engine.nodes["b"]
    engine.now = 1.0
    watch.check({1, 2})
    watch.finished(1, 1)
    del engine.nodes["c"]  # lost after the last look: found by the look at the end
    watch.close()  # partition 2 never came back (the run was stopped)
    assert engine.lines == [lost_node_line("tsn2", "ray", 1), lost_node_line("tsn3", "ray", 0)]


def test_two_nodes_lost_at_once_each_get_a_line_and_a_rerun_counts_once():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    del engine.nodes["b"], engine.nodes["c"]
    engine.now = 1.0
    watch.check({1, 2})
    watch.finished(1, 1)
    watch.finished(2, 1)
    assert engine.lines == [lost_node_line("tsn2", "ray", 2), lost_node_line("tsn3", "ray", 0)]


def test_a_node_that_joins_later_can_be_lost_too():
    engine = Engine({"a": "tsn1"})
    watch = engine.watch(poll_s=1.0)
    engine.nodes["d"] = "tsn4"
    engine.now = 1.0
    watch.check(set())
    del engine.nodes["d"]
    engine.now = 2.0
    watch.check(set())
    assert engine.lines == [lost_node_line("tsn4", "ray", 0)]


def test_a_failed_look_is_skipped_and_never_fails_the_run():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    engine.live = lambda: (_ for _ in ()).throw(ConnectionError("GCS busy"))  # type: ignore[method-assign]
    engine.now = 1.0
    watch.check({1})
    watch.close()
    assert engine.lines == []


def test_an_engine_that_counts_reruns_itself_is_said_at_once():
    """Dask: the scheduler's count, read when the loss is seen, for the partitions in flight."""
    engine = Engine(THREE)
    asked = []
    watch = engine.watch(poll_s=1.0, count_reruns=lambda running: asked.append(set(running)) or 2)
    del engine.nodes["b"]
    engine.now = 1.0
    watch.check({4, 5, 6})
    assert asked == [{4, 5, 6}]
    assert engine.lines == [lost_node_line("tsn2", "ray", 2)]


class Handles:
    """Stand-in engine for in_flight: each handle finishes on the wait after its submission."""

    def __init__(self) -> None:
        self.submitted: List[int] = []

    def submit(self, chunk: int) -> int:
        self.submitted.append(chunk)
        return chunk

    def wait_some(self, handles, timeout):
        return handles[:1]


class NoStop:
    requested = False

    def abandon_now(self) -> bool:
        return False


def test_in_flight_checks_after_each_wait_and_closes_at_the_end():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    handles = Handles()
    seen = []
    for index, handle in in_flight(list(range(4)), NoStop(), 2, handles.submit, handles.wait_some, lambda h: None, watch):
        engine.now += 1.0
        if index == 1:
            del engine.nodes["b"]
        watch.finished(index, 1 if index == 3 else 0)
        seen.append(index)
    assert seen == [0, 1, 2, 3]
    # the look after partition 2's wait saw tsn2 gone with 2 and 3 in flight; 3 came back rerun
    assert engine.lines == [lost_node_line("tsn2", "ray", 1)]


def test_ray_notices_of_a_lost_node_are_dropped_during_a_compute_and_nothing_else(monkeypatch):
    pytest.importorskip("ray")
    from ray._private import worker

    from toksearch_launch.pipeline.node_loss import quiet_ray_node_loss

    printed = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"][0]))
    notices = [
        "Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL ...\n    [state-dump] ...",
        "The node with node id: f5d3d376 and address: 10.77.0.2 and node name: 10.77.0.2 has been marked dead "
        "because the detector has missed too many heartbeats from it.\n\t(2) raylet has lagging heartbeats",
        "Task _ray_partition failed. There are 3 retries remaining, so the task will be retried. Error: Task "
        "failed because the node it was running on is dead or unavailable.",
    ]
    others = ["Task _ray_partition failed. Retries exhausted. Error: ...", "some worker's own line"]
    with quiet_ray_node_loss():
        for line in notices + others:
            worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, False)
        worker.print_to_stdstream({"lines": [notices[0]], "pid": 1234, "is_err": True}, False)  # not Ray's notice
    worker.print_to_stdstream({"lines": [notices[0]], "pid": "raylet", "is_err": False}, False)  # after the compute
    assert printed == others + [notices[0], notices[0]]


def test_a_failed_run_says_what_was_seen_without_another_look():
    engine = Engine(THREE)
    watch = engine.watch(poll_s=1.0)
    handles = Handles()
    with pytest.raises(RuntimeError):
        for index, _ in in_flight(list(range(3)), NoStop(), 2, handles.submit, handles.wait_some, lambda h: None, watch):
            engine.now += 1.0
            if index == 0:
                del engine.nodes["b"]
            if index == 1:
                looks = engine.looks
                raise RuntimeError("the head is gone")
    assert engine.looks == looks  # no look at the end: a dead engine could hang it
    assert engine.lines == [lost_node_line("tsn2", "ray", 0)]


class SparkExecutors:
    """Stands in for ``sc`` where spark_live_nodes reads it: ``sc._jsc.sc().statusTracker().getExecutorInfos()``."""

    class Info:
        def __init__(self, host: str, port: int) -> None:
            self._host, self._port = host, port

        def host(self) -> str:
            return self._host

        def port(self) -> int:
            return self._port

    def __init__(self, *executors) -> None:
        self.executors = list(executors)
        self._jsc = self

    def sc(self):
        return self

    def statusTracker(self):
        return self

    def getExecutorInfos(self):
        return [self.Info(host, port) for host, port in self.executors]


def test_a_spark_executor_getting_its_block_manager_port_is_no_lost_node():
    # tsn3's block manager not registered yet: port 0, as measured on the test cluster (-1: no port at all)
    sc = SparkExecutors(("tsn1", 40001), ("tsn2", 40002), ("tsn3", 0), ("tsn4", -1))
    assert spark_live_nodes(sc) == {"tsn1:40001": "tsn1", "tsn2:40002": "tsn2"}
    del sc.executors[3]
    lines: List[str] = []
    now = [0.0]
    watch = NodeWatch("spark", lambda: spark_live_nodes(sc), say=lines.append, clock=lambda: now[0], poll_s=1.0)
    sc.executors[2] = ("tsn3", 40003)  # it registers: a new key, and no key leaves
    now[0] = 1.0
    watch.check({0})
    watch.finished(0, 0)
    assert lines == [] and watch.known == {"tsn1:40001": "tsn1", "tsn2:40002": "tsn2", "tsn3:40003": "tsn3"}
    del sc.executors[1]  # tsn2 lost: it is said, with its partition in flight rerun
    now[0] = 2.0
    watch.check({1})
    watch.finished(1, 1)
    assert lines == [lost_node_line("tsn2", "spark", 1)]
