"""Spark backend: one RDD partition per pipeline partition, results collected in partition order."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pickle
import sys
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

from toksearch_launch.cluster import job_cluster
from toksearch_launch.engines import require as require_engine
from toksearch_launch.pipeline.driver import PartitionResult, drive, in_flight
from toksearch_launch.pipeline.local_backends import usable_cpus
from toksearch_launch.pipeline.node_loss import NodeWatch, spark_attempt, spark_live_nodes
from toksearch_launch.pipeline.ops import Item, Op, run_partition
from toksearch_launch.pipeline.results import ResultSet, SparkRecordSet, as_record_set
from toksearch_launch.pipeline.store import AUTO, decode_body, encode_body, item_shot, resolve_store


def _spark_partition(broadcast: Any, chunks: Iterable[List[Item]]) -> Iterator[Tuple[Any, ...]]:
    """A partition holds one chunk; it yields a single (the records and stats as
    ``store.encode_body`` bytes, pickled once for the driver and the store alike; attempt
    number: above 0 when Spark reran the task, e.g. after an executor loss). The steps come
    from a broadcast (cloudpickled once per run), unpickled once per Python worker."""
    ops = getattr(broadcast, "_toksearch_ops", None)  # the worker's broadcast object lives as long as the run
    if ops is None:
        ops = pickle.loads(broadcast.value)
        broadcast._toksearch_ops = ops
    items = [item for chunk in chunks for item in chunk]
    shots = [item_shot(item) for item in items]  # the input shots: where each output record came from
    records, stats = run_partition(ops, items)
    yield encode_body(records, shots, stats), spark_attempt()


class SparkExecutor:
    """One Spark job per partition, about one per executor core at a time, each collected as it
    finishes (a single collect() would return nothing until the last partition is done)."""

    def __init__(self, sc: Any, ops: Sequence[Op], num_cpus: int) -> None:
        from pyspark import cloudpickle

        self.sc = sc
        self.broadcast = sc.broadcast(cloudpickle.dumps(list(ops)))
        self.num_cpus = max(1, num_cpus)

    def results(self, chunks: List[List[Item]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]:
        rdd = self.sc.parallelize(chunks, len(chunks))
        func = functools.partial(_spark_partition, self.broadcast)

        watch = NodeWatch("spark", functools.partial(spark_live_nodes, self.sc))

        def one(index: int) -> Tuple[int, PartitionResult, Optional[int]]:
            [(body, attempt)] = self.sc.runJob(rdd, func, [index])
            return index, (*decode_body(body), body), attempt

        def wait_some(futures: List[Any], timeout: float) -> Any:
            return concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)[0]

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.num_cpus)
        try:
            for _, future in in_flight(list(range(len(chunks))), stop, self.num_cpus,
                                       lambda index: pool.submit(one, index), wait_some,
                                       lambda futures: self.sc.cancelAllJobs(), watch):
                index, result, attempt = future.result()
                watch.finished(index, attempt)
                yield index, result
        finally:
            pool.shutdown(wait=not stop.requested, cancel_futures=True)


def local_session(num_cpus: Optional[int] = None) -> Any:
    """A ``local[N]`` SparkSession whose Python workers run this interpreter with this sys.path."""
    from pyspark.sql import SparkSession

    n = num_cpus or usable_cpus()
    builder = (
        SparkSession.builder.master(f"local[{n}]")
        .appName("toksearch")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if not os.environ.get("SPARK_LOCAL_IP"):
        # A local job needs no network: binding to loopback avoids hostname-resolution failures.
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    # Ray does the same for its workers: modules importable by the driver (the script's
    # directory, a test suite) stay importable by the Python workers.
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    builder = builder.config(
        "spark.executorEnv.PYTHONPATH", os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p)))
    )
    # PySpark reads the workers' interpreter from PYSPARK_PYTHON when the context is made;
    # without it, "python3" from PATH, which may lack numpy or this package.
    set_python = not os.environ.get("PYSPARK_PYTHON")
    if set_python:
        os.environ["PYSPARK_PYTHON"] = sys.executable
    try:
        session = builder.getOrCreate()
    finally:
        if set_python:
            os.environ.pop("PYSPARK_PYTHON", None)
    session.sparkContext.setLogLevel("ERROR")
    return session


#: The driver's loggers that narrate a lost executor (measured on the test cluster: about 60
#: lines, most of them Java stack traces, for one lost node), and the level each is set to.
#: The pipeline says the loss in one line (pipeline/node_loss.py). TaskSetManager keeps its
#: ERRORs (a task failed too often: the job is aborted), its WARN per lost task goes; the
#: connection loggers' ERRORs are the same loss seen from the sockets, so they go too.
EXECUTOR_LOSS_LOGGERS = {
    "org.apache.spark.network.server.TransportChannelHandler": "FATAL",  # "Exception in connection from" + trace
    "org.apache.spark.network.client.TransportResponseHandler": "FATAL",  # "Still have N requests outstanding"
    "org.apache.spark.network.client.TransportClient": "FATAL",  # "Failed to send RPC" + trace
    "org.apache.spark.scheduler.TaskSchedulerImpl": "FATAL",  # "Lost executor N on HOST": our line says it
    "org.apache.spark.scheduler.TaskSetManager": "ERROR",  # "Lost task ... ExecutorLostFailure"
    "org.apache.spark.scheduler.cluster": "ERROR",  # the scheduler backends: "removing executor"
    "org.apache.spark.storage.BlockManagerMasterEndpoint": "ERROR",  # "Error trying to remove broadcast" + trace
    "org.apache.spark.storage.BlockManagerMaster": "ERROR",
    "org.apache.spark.rpc.netty": "ERROR",  # NettyRpcEnv / Inbox: "Ignored failure"
}


def quiet_executor_loss_logs(sc: Any) -> None:
    """Set the driver's log4j2 levels of :data:`EXECUTOR_LOSS_LOGGERS` (through py4j: the driver
    JVM is already running). Logging only: never fail a run over it."""
    try:
        jvm = sc._jvm
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        levels = jvm.org.apache.logging.log4j.Level
        for name, level in EXECUTOR_LOSS_LOGGERS.items():
            configurator.setLevel(name, levels.toLevel(level))
    except Exception as exc:  # an older Spark (log4j 1) or another logging backend
        print(f"toksearch: could not quiet Spark's executor-loss logging: {str(exc).splitlines()[0]}",
              file=sys.stderr, flush=True)


def executor_hosts(sc: Any) -> List[str]:
    """Hosts of the Spark executors, sorted.

    The status tracker lists every block manager, the driver's included. The
    driver's entry is dropped by host when it is the only one on that host (an
    executor beside the driver keeps the host listed); in local mode the driver
    is the executor. (``SparkContext.env`` would identify it exactly, but py4j
    cannot load SparkEnv's class here: it kills the gateway thread.)
    """
    try:
        infos = sc._jsc.sc().statusTracker().getExecutorInfos()
        hosts = [str(i.host()) for i in infos]
    except Exception:  # diagnostics only: never fail a run over it
        return []
    if not str(sc.master).startswith("local"):
        driver = sc.getConf().get("spark.driver.host")
        if driver is not None and hosts.count(driver) == 1:
            hosts.remove(driver)
    return sorted(set(hosts))


def compute_spark(
    ops: Sequence[Op],
    records: List[Item],
    *,
    sc: Any,
    numparts: Optional[int],
    cache: bool,
    batch_size: Optional[int],
    verbose: bool,
    store: Any = AUTO,
) -> ResultSet:
    """Use ``sc`` / the active context / the job's cluster / a local session; stop only a session made here."""
    if not records:
        return SparkRecordSet([], None, {"backend": "spark"})
    require_engine("spark")  # one line naming the extra, not a ModuleNotFoundError
    opened = resolve_store(store, ops, records)  # before the cluster starts: its stop signal counts too
    from pyspark import SparkContext

    connection = "user"  # see ray_backend.compute_ray: user, job or local
    created = None  # a local session started here, to stop afterwards
    new_gateway = False
    cluster_cpus: Optional[int] = None
    if sc is None:
        sc = SparkContext._active_spark_context
        if sc is None:
            cluster = job_cluster("spark")
            if cluster is not None:
                # The job's cluster owns this session and stops it when the job ends:
                # a second compute_spark() in the script reuses it.
                sc = cluster.connect().sparkContext
                cluster_cpus = int(cluster.num_cpus)
                connection = "job"
            else:
                connection = "local"
                new_gateway = SparkContext._gateway is None
                created = local_session()
                sc = created.sparkContext
        quiet_executor_loss_logs(sc)  # a driver this call chose; a driver the caller passed keeps its logging
    else:
        sc = getattr(sc, "sparkContext", sc)  # a SparkSession is accepted too
    try:
        num_cpus = cluster_cpus or int(sc.defaultParallelism)
        result = drive(
            SparkExecutor(sc, ops, num_cpus),
            records,
            backend="spark",
            num_cpus=num_cpus,
            numparts=numparts,
            batch_size=batch_size,
            verbose=verbose,
            info={"cache": cache},
            store=opened,
        )
        result.info["nodes"] = executor_hosts(sc)
        result.info["connection"] = connection
        return as_record_set(result, SparkRecordSet)
    finally:
        if created is not None:
            stop_local_session(created, new_gateway)


def stop_local_session(session: Any, stop_gateway: bool) -> None:
    """Stop a session made here and, if this call launched it, the driver JVM too.

    A driver JVM keeps the configuration it was launched with (for instance the
    SPARK_CONF_DIR of a job cluster's auth), so leaving it running would make a
    later connection to another cluster fail; it would also outlive the run.
    """
    if stop_gateway:
        from toksearch_launch.cluster.spark import disconnect

        disconnect(session)  # the session, then the driver JVM
    else:
        session.stop()
