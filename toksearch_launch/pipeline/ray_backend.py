"""Ray backend: one Ray task per partition; the steps are pickled once per run, not once per task."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from toksearch_launch.cluster import job_cluster
from toksearch_launch.engines import require as require_engine
from toksearch_launch.pipeline.driver import PartitionResult, drive, in_flight
from toksearch_launch.pipeline.node_loss import NodeWatch, quiet_ray_node_loss, ray_attempt, ray_live_nodes
from toksearch_launch.pipeline.ops import Item, Op, RunStats, records_from_wire, run_partition_wire
from toksearch_launch.pipeline.results import RayRecordSet, ResultSet, as_record_set
from toksearch_launch.pipeline.store import AUTO, resolve_store


#: ray.init defaults for a local Ray (the caller's ray_init_kwargs win): no dashboard
#: (faster start, fewer processes), no INFO chatter.
LOCAL_RAY_DEFAULTS: Dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}

#: A pickled pipeline larger than this goes through the object store once instead of
#: inline in every task (Ray would otherwise store a copy per task).
INLINE_LIMIT = 64 * 1024


def _ray_partition(payload: bytes, chunk: List[Any]) -> List[Any]:
    """``[rows, stats, attempt]``: a list, not a tuple, so Ray sends the rows with msgpack (only
    values msgpack cannot hold are pickled, each on its own; the stats go as a list). A tuple would pickle
    everything, whose unpickling set off about 3x the garbage collections on the driver
    (28 against 8 for 10,000 records) and with them a full collection every few runs.
    ``attempt`` is this task's attempt number: above 0 when Ray reran it, e.g. after a node loss."""
    import pickle

    with young_objects_collected():
        rows, stats = run_partition_wire(pickle.loads(payload), chunk)
    return [rows, stats.to_wire(), ray_attempt()]


@contextlib.contextmanager
def young_objects_collected() -> Iterator[None]:
    """For a partition's duration, garbage collections look only at the objects made during it.

    A Ray process holds about 65,000 objects of Ray's own (the driver: the user's too); the
    collections set off by building a partition's records walked them all now and then (with
    the records copied for the wire, the largest single cost of a trivial partition in py-spy).
    ``gc.freeze()`` sets them aside until ``gc.unfreeze()`` gives them back
    to the oldest generation: nothing is left uncollected, only collected later. Skipped when
    the process froze objects itself or turned collection off."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@functools.lru_cache(maxsize=None)
def _remote_partition() -> Any:
    """The remote function, made on first use so importing this module does not import Ray."""
    import ray

    return ray.remote(_ray_partition)


class RayExecutor:
    """Keeps every CPU busy with a partition queued behind it and hands back each as it finishes."""

    def __init__(self, ops: Sequence[Op], memory_per_shot: Optional[int], num_cpus: int,
                 placement_group: Any = None, live_nodes: Optional[Dict[str, str]] = None) -> None:
        import ray
        from ray import cloudpickle

        payload = cloudpickle.dumps(list(ops))
        self.ops: Any = payload if len(payload) <= INLINE_LIMIT else ray.put(payload)
        self.memory_per_shot = memory_per_shot
        self.num_cpus = max(1, num_cpus)
        #: The live nodes compute_ray just read: the first batch's watch starts from them
        #: instead of asking the GCS again (about 1.5 ms a query).
        self.live_nodes = live_nodes
        self.task_options: Dict[str, Any] = {}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            self.task_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group)

    def _submit(self, chunk: List[Any]) -> Any:
        options = dict(self.task_options)
        if self.memory_per_shot:
            options["memory"] = int(self.memory_per_shot) * len(chunk)
        fn = _remote_partition()
        task = fn.options(**options) if options else fn
        return task.remote(self.ops, chunk)

    def _first_look_given(self, look: Callable[[], Dict[str, str]]) -> Callable[[], Dict[str, str]]:
        """``look``, except that its first call returns the nodes already read, if any."""
        given, self.live_nodes = self.live_nodes, None

        def first_given() -> Dict[str, str]:
            nonlocal given
            if given is not None:
                view, given = given, None
                return view
            return look()

        return first_given

    def results(self, chunks: List[List[Any]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]:
        """Two partitions per CPU in flight (one running, one queued, so no worker waits for
        the driver's next submission), each handed back as it finishes."""
        import ray

        fetched: Dict[Any, Any] = {}

        def wait_some(refs: List[Any], timeout: float) -> List[Any]:
            ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready and rest:  # whatever else is done too, without waiting
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            fetched.update(fetch_all(ready))
            return ready

        def cancel(refs: List[Any]) -> None:
            for ref in refs:
                ray.cancel(ref, force=True)

        window = 2 * self.num_cpus
        watch = NodeWatch("ray", self._first_look_given(ray_live_nodes))
        with quiet_ray_node_loss():  # the watch's one line instead of Ray's many
            for index, ref in in_flight(chunks, stop, window, self._submit, wait_some, cancel, watch):
                with gc_paused():
                    rows, stats, attempt = fetched.pop(ref) if ref in fetched else ray.get(ref)
                    records = records_from_wire(rows)
                watch.finished(index, attempt)
                yield index, (records, RunStats.from_wire(stats))


def fetch_all(refs: List[Any]) -> Dict[Any, Any]:
    """The values of finished refs in one ``ray.get`` (one call per ref costs about 0.2 ms
    each); if one failed, none, so each is fetched on its own and the good ones are
    handed back (and stored) before the failure is raised."""
    import ray

    if len(refs) < 2:
        return {}
    try:
        with gc_paused():
            return dict(zip(refs, ray.get(refs)))
    except Exception:
        return {}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while finished partitions are unpacked on the driver.

    Unpacking makes thousands of objects and no garbage (plain dicts and lists from msgpack,
    Records filled from them), yet each 700 allocations set off a collection that walked the
    records made so far: in a trivial run that was a fifth of the driver's CPU. The refs are
    finished before this is entered, so collection is off for no wait, only the unpacking."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive_nodes(table: List[Dict[str, Any]]) -> Tuple[List[str], int]:
    """(NodeManagerAddress of every alive Ray node, sorted; their CPUs) from ``ray.nodes()``."""
    alive = [n for n in table if n.get("Alive")]
    cpus = int(sum(n.get("Resources", {}).get("CPU", 0) for n in alive))
    return sorted({n["NodeManagerAddress"] for n in alive}), cpus


def compute_ray(
    ops: Sequence[Op],
    records: List[Item],
    *,
    numparts: Optional[int],
    batch_size: Optional[int],
    verbose: bool,
    memory_per_shot: Optional[int],
    ray_init_kwargs: Dict[str, Any],
    placement_group_func: Optional[Any] = None,
    store: Any = AUTO,
) -> ResultSet:
    """Attach to (or start) Ray, run, bring the kept fields back, shut down what was started here.

    ``info["connection"]``: ``user`` (Ray was initialized before the call), ``job``
    (the job cluster's) or ``local`` (started and shut down here); RayRecordSet.cleanup
    closes only a ``user`` connection, as TokSearch's does.
    """
    if not records:
        return RayRecordSet([], None, {"backend": "ray"})
    require_engine("ray")  # one line naming the extra, not a ModuleNotFoundError
    opened = resolve_store(store, ops, records)  # before the cluster starts: its stop signal counts too
    import ray

    connection = "user" if ray.is_initialized() else "local"
    created = False  # a local Ray started here, to shut down afterwards
    cluster_cpus: Optional[int] = None
    if ray.is_initialized() and ray_init_kwargs:
        warnings.warn(
            f"compute_ray: Ray is already initialized; ignoring {sorted(ray_init_kwargs)}", RuntimeWarning, stacklevel=3
        )
    if not ray.is_initialized():
        cluster = job_cluster("ray")
        if cluster is not None:
            # The job's cluster owns this connection and closes it when the job ends:
            # a second compute_ray() in the script reuses it.
            cluster.connect(**ray_init_kwargs)
            cluster_cpus = int(cluster.num_cpus)
            connection = "job"
        else:
            ray.init(**{**LOCAL_RAY_DEFAULTS, **ray_init_kwargs})
            created = True
    try:
        table = ray.nodes()  # one GCS query for the CPUs, the node list and the watch's first look
        nodes, ray_cpus = alive_nodes(table)
        num_cpus = cluster_cpus or ray_cpus or 1
        placement_group = None
        if placement_group_func is not None:
            placement_group = placement_group_func()
            ray.get(placement_group.ready())
        executor = RayExecutor(ops, memory_per_shot, num_cpus, placement_group, ray_live_nodes(table))
        with young_objects_collected():
            result = drive(
                executor,
                records,
                backend="ray",
                num_cpus=num_cpus,
                numparts=numparts,
                batch_size=batch_size,
                verbose=verbose,
                store=opened,
            )
        result.info["nodes"] = nodes
        result.info["connection"] = connection
        return as_record_set(result, RayRecordSet)
    finally:
        if created:
            ray.shutdown()
