"""Spark backend: one RDD partition per pipeline partition, results collected in partition order."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

from toksearch_launch.cluster import job_cluster
from toksearch_launch.pipeline.driver import OnDone, PartitionResult, drive, progress_wanted
from toksearch_launch.pipeline.local_backends import usable_cpus
from toksearch_launch.pipeline.ops import Item, Op, records_from_wire, run_partition_wire
from toksearch_launch.pipeline.results import ResultSet, SparkRecordSet, as_record_set

#: How often (s) the progress display reads the task counters while a job runs.
PROGRESS_POLL_S = 0.25


def _spark_partition(ops: Sequence[Op], counters: Optional[Tuple[Any, Any]], chunks: Iterable[List[Item]]) -> Iterator[PartitionResult]:
    """A partition holds one chunk (a list of Records); it yields a single (records, stats)."""
    items = [item for chunk in chunks for item in chunk]
    rows, stats = run_partition_wire(ops, items)
    if counters is not None:
        counters[0].add(stats.records_in)
        counters[1].add(stats.records_with_errors + stats.where_errors)
    yield rows, stats


class SparkExecutor:
    """Parallelizes a batch's chunks one per partition and collects them."""

    def __init__(self, sc: Any, ops: Sequence[Op], poll_progress: bool) -> None:
        self.sc = sc
        self.ops = list(ops)
        self.poll_progress = poll_progress

    def run(self, chunks: List[List[Item]], on_done: OnDone) -> List[PartitionResult]:
        rdd = self.sc.parallelize(chunks, len(chunks))
        if not self.poll_progress:
            results = rdd.mapPartitions(functools.partial(_spark_partition, self.ops, None)).collect()
            for _, stats in results:
                on_done(stats.records_in, stats.records_with_errors, stats.where_errors)
            return [(records_from_wire(rows), stats) for rows, stats in results]

        done_acc = self.sc.accumulator(0)
        err_acc = self.sc.accumulator(0)
        job = rdd.mapPartitions(functools.partial(_spark_partition, self.ops, (done_acc, err_acc)))
        reported = [0, 0]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(job.collect)
            while True:
                try:
                    results = future.result(timeout=PROGRESS_POLL_S)
                    break
                except concurrent.futures.TimeoutError:
                    done, errs = done_acc.value, err_acc.value
                    on_done(done - reported[0], errs - reported[1], 0)
                    reported = [done, errs]
        total = sum(s.records_in for _, s in results)
        errors = sum(s.records_with_errors + s.where_errors for _, s in results)
        on_done(total - reported[0], errors - reported[1], 0)
        return [(records_from_wire(rows), stats) for rows, stats in results]


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
) -> ResultSet:
    """Use ``sc`` / the active context / the job's cluster / a local session; stop only a session made here."""
    if not records:
        return SparkRecordSet([], None, {"backend": "spark"})
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
    else:
        sc = getattr(sc, "sparkContext", sc)  # a SparkSession is accepted too
    try:
        num_cpus = cluster_cpus or int(sc.defaultParallelism)
        result = drive(
            SparkExecutor(sc, ops, poll_progress=progress_wanted(verbose)),
            records,
            backend="spark",
            num_cpus=num_cpus,
            numparts=numparts,
            batch_size=batch_size,
            verbose=verbose,
            info={"cache": cache},
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
