"""Dask backend: one ``client.submit`` per partition on a dask.distributed cluster.

Where it runs, first match: the ``client`` given; inside toksearch_submit, the
job's Dask cluster (:func:`~toksearch_launch.cluster.job_cluster`, started on
first use, mutual TLS); a default client this process already has; else a new
``LocalCluster`` of single-threaded worker processes, closed afterwards.
Batching, partitions and the summary come from the shared driver loop.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from toksearch_launch.cluster import job_cluster
from toksearch_launch.engines import require as require_engine
from toksearch_launch.pipeline.driver import PartitionResult, drive, in_flight
from toksearch_launch.pipeline.local_backends import usable_cpus
from toksearch_launch.pipeline.node_loss import NodeWatch, dask_live_nodes, dask_reruns
from toksearch_launch.pipeline.ops import Item, Op, RunStats, records_from_wire, run_partition_wire
from toksearch_launch.pipeline.results import ResultSet
from toksearch_launch.pipeline.store import AUTO, resolve_store

#: A pickled pipeline larger than this is scattered to the workers once instead of
#: travelling inside every task.
INLINE_LIMIT = 64 * 1024


def _dask_partition(payload: bytes, chunk: List[Any]) -> Tuple[List[dict], RunStats]:
    return run_partition_wire(pickle.loads(payload), chunk)


class DaskExecutor:
    """Keeps about one partition per worker thread running and hands back each as it finishes."""

    def __init__(self, client: Any, ops: Sequence[Op], num_cpus: int) -> None:
        from distributed.protocol.pickle import dumps  # cloudpickle: steps defined in __main__ or closures

        payload = dumps(list(ops))
        self.client = client
        self.num_cpus = max(1, num_cpus)
        self.ops: Any = payload if len(payload) <= INLINE_LIMIT else client.scatter(payload, broadcast=True)

    def results(self, chunks: List[List[Item]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]:
        """About one partition per worker thread in flight (plus a few queued), each fetched as it finishes."""
        finished = threading.Event()  # set by each future as it finishes (distributed.wait needs a default client)
        running: set = set()  # keys in flight, for the reruns of a lost worker
        watch = NodeWatch("dask", lambda: dask_live_nodes(self.client),
                          count_reruns=lambda _: dask_reruns(self.client, running))

        def submit(chunk: List[Item]) -> Any:
            future = self.client.submit(_dask_partition, self.ops, chunk, pure=False)
            future.add_done_callback(lambda _: finished.set())
            running.add(future.key)
            return future

        def wait_some(futures: List[Any], timeout: float) -> List[Any]:
            done = [f for f in futures if f.done()]
            if not done:
                finished.wait(timeout)
                finished.clear()
                done = [f for f in futures if f.done()]
            return done

        def cancel(futures: List[Any]) -> None:
            self.client.cancel(futures, force=True)

        window = self.num_cpus + max(1, self.num_cpus // 4)
        for index, future in in_flight(chunks, stop, window, submit, wait_some, cancel, watch):
            running.discard(future.key)
            rows, stats = future.result()
            yield index, (records_from_wire(rows), stats)


def client_cpus(client: Any) -> Tuple[List[str], int]:
    """(hosts of the workers, sorted; their threads in all) from one scheduler query."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    hosts = sorted({w.get("host", "") for w in workers.values()})
    return hosts, int(sum(w.get("nthreads", 0) for w in workers.values()))


def local_client(num_workers: Optional[int] = None) -> Any:
    """A LocalCluster of single-threaded worker processes on loopback, no dashboard."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=num_workers or usable_cpus(), threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                           scheduler_kwargs={"dashboard": False}, worker_dashboard_address=None)
    return Client(cluster, set_as_default=False)


def _existing_client() -> Any:
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def compute_dask(
    ops: Sequence[Op],
    records: List[Item],
    *,
    client: Any,
    numparts: Optional[int],
    batch_size: Optional[int],
    verbose: bool,
    store: Any = AUTO,
) -> ResultSet:
    """Use ``client`` / the job's cluster / the default client / a local cluster; close only what was made here."""
    if not records:
        return ResultSet([], None, {"backend": "dask"})
    require_engine("dask")  # one line naming the extra, not a ModuleNotFoundError
    opened = resolve_store(store, ops, records)  # before the cluster starts: its stop signal counts too
    created = None
    cluster_cpus: Optional[int] = None
    if client is None:
        cluster = job_cluster("dask")
        if cluster is not None:
            # The job's cluster owns this client and closes it when the job ends.
            client = cluster.connect()
            cluster_cpus = int(cluster.num_cpus)
        else:
            client = _existing_client()
            if client is None:
                client = created = local_client()
    try:
        hosts, cpus = client_cpus(client)
        num_cpus = cluster_cpus or cpus or 1
        result = drive(
            DaskExecutor(client, ops, num_cpus), records, backend="dask", num_cpus=num_cpus,
            numparts=numparts, batch_size=batch_size, verbose=verbose, store=opened,
        )
        result.info["nodes"] = hosts
        return result
    finally:
        if created is not None:
            local = created.cluster
            created.close()
            local.close()
