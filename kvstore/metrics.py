"""Metrics: the app's Prometheus registry, its collectors and ``/metrics``.

Every app has its own aioprometheus ``Registry``. Requests are counted and
timed by route template (``/keys/{id}``, never the key itself), and the store
the routes use is wrapped in ``InstrumentedStore``, which times every call
and counts keys and bytes. Gauges that describe a moment (pool use, whether
Redis answers, the process's memory) are read when a scrape arrives.

With several Hypercorn workers each process counts only the requests it
served, so a scrape answered from one registry alone would be wrong. When
``KVSTORE_METRICS_DIR`` is set (``kvstore serve`` sets it for more than one
worker), every worker listens on a unix socket in that directory and hands
over its current values on request; the worker that answers a scrape adds
up every worker's counters and histograms and combines their gauges, so each
scrape covers the whole server whichever worker it reaches. A worker that
exits leaves its final counts behind in the directory, so totals never go
down while the server runs.
"""

import asyncio
import contextlib
import logging
import os
import platform
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

import orjson
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.histogram import Histogram as HistogramValue
from aioprometheus.renderer import render
from quart import Blueprint, Quart, Response, request
from werkzeug.exceptions import NotFound

from kvstore import __version__
from kvstore.api import StoreHolder
from kvstore.errors import ProblemError
from kvstore.settings import Settings, tcp_port
from kvstore.store import ERROR_KINDS, Entry, Meta, PoolStats, Store, StoreError

log = logging.getLogger(__name__)

# Upper bounds, in seconds, for request and Redis latencies: from a tenth of
# a millisecond (a cached read on loopback) to ten seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Upper bounds for the number of keys one wildcard read returns.
KEY_COUNT_BUCKETS = (0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1e6)

# Request methods kept as label values; any other becomes "other", so a
# client cannot create series by inventing methods.
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})

# How long a worker waits for another worker's values before failing the scrape.
PEER_TIMEOUT = 3.0

GaugeMerge = Literal["sum", "min", "max", "local"]

# How the gauges of several workers combine into the server's value. "local"
# keeps the value of the worker answering the scrape, which measured it then.
GAUGE_MERGE: dict[str, GaugeMerge] = {
    "kvstore_redis_up": "local",
    "kvstore_redis_pool_connections": "sum",
    "kvstore_redis_pool_max_connections": "sum",
    "kvstore_build_info": "max",
    "kvstore_worker_processes": "local",
    "process_start_time_seconds": "min",
    "process_resident_memory_bytes": "sum",
    "process_open_fds": "sum",
}

# One worker's values: metric name to [labels, value] pairs. A histogram's
# value is [cumulative bucket counts in bound order, sum, count].
Snapshot = dict[str, list[list[Any]]]


class MetricsUnavailableError(ProblemError):
    """A worker did not hand over its values, so no complete scrape exists."""

    status = 503
    title = "Service Unavailable"


class Collectors:
    """The metric families of kvstore, registered on one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.requests = Counter(
            "kvstore_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            registry=registry,
        )
        self.request_duration = Histogram(
            "kvstore_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, in seconds.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.redis_duration = Histogram(
            "kvstore_redis_command_duration_seconds",
            "Time of each store call to Redis by operation, in seconds, "
            "waiting for a pooled connection and retries included.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.redis_errors = Counter(
            "kvstore_redis_errors_total",
            "Store calls that failed, by kind of Redis failure.",
            registry=registry,
        )
        self.redis_up = Gauge(
            "kvstore_redis_up",
            "Whether Redis answered a PING during the scrape (1) or not (0).",
            registry=registry,
        )
        self.pool_connections = Gauge(
            "kvstore_redis_pool_connections",
            "Connections of the Redis pool, by state (in_use or idle).",
            registry=registry,
        )
        self.pool_max = Gauge(
            "kvstore_redis_pool_max_connections",
            "The most connections the Redis pool may open.",
            registry=registry,
        )
        self.keys_written = Counter(
            "kvstore_keys_written_total",
            "Keys stored by PUT, one per pair of a bulk write.",
            registry=registry,
        )
        self.keys_read = Counter(
            "kvstore_keys_read_total",
            "Keys found by GET or HEAD of one key, or returned by a wildcard read.",
            registry=registry,
        )
        self.key_misses = Counter(
            "kvstore_key_misses_total",
            "GET or HEAD of one key that did not exist, expired ones included.",
            registry=registry,
        )
        self.keys_expired_on_read = Counter(
            "kvstore_keys_expired_on_read_total",
            "Reads that found their key past its expiry, which removed it.",
            registry=registry,
        )
        self.keys_deleted = Counter(
            "kvstore_keys_deleted_total",
            "Keys removed by DELETE of one key or of a filter.",
            registry=registry,
        )
        self.bytes_written = Counter(
            "kvstore_value_written_bytes_total",
            "Bytes of JSON values sent to Redis.",
            registry=registry,
        )
        self.bytes_read = Counter(
            "kvstore_value_read_bytes_total",
            "Bytes of JSON values received from Redis.",
            registry=registry,
        )
        self.wildcard_keys = Histogram(
            "kvstore_wildcard_read_keys",
            "Keys returned by each wildcard read (GET /keys).",
            registry=registry,
            buckets=KEY_COUNT_BUCKETS,
        )
        self.build_info = Gauge(
            "kvstore_build_info",
            "Always 1; the labels name the kvstore and Python versions.",
            registry=registry,
        )
        self.worker_processes = Gauge(
            "kvstore_worker_processes",
            "Worker processes whose values this scrape includes.",
            registry=registry,
        )
        self.start_time = Gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            registry=registry,
        )
        self.cpu = Counter(
            "process_cpu_seconds_total",
            "User and system CPU time the process has used, in seconds.",
            registry=registry,
        )
        self.memory = Gauge(
            "process_resident_memory_bytes",
            "Resident memory of the process, in bytes.",
            registry=registry,
        )
        self.open_fds = Gauge(
            "process_open_fds",
            "File descriptors the process has open.",
            registry=registry,
        )


class Tally:
    """Counts for one counter, kept in a plain dict until the counter is read.

    aioprometheus spends microseconds on the label dict of every call, and a
    request counts several things; here a count is one dict update, and the
    sums fold into the counter when a scrape or a worker exchange reads it.
    """

    __slots__ = ("_counter", "_names", "_pending")

    def __init__(self, counter: Counter, names: tuple[str, ...] = ()) -> None:
        self._counter = counter
        self._names = names
        self._pending: dict[tuple[str, ...], float] = {}

    def add(self, amount: float, values: tuple[str, ...] = ()) -> None:
        """Add ``amount`` to the series with these label values."""
        pending = self._pending
        pending[values] = pending.get(values, 0) + amount

    def fold(self) -> None:
        """Move the pending sums into the counter."""
        for values, amount in self._pending.items():
            self._counter.add(dict(zip(self._names, values, strict=True)), amount)
        self._pending.clear()


class FastHistogram:
    """Observations for one histogram, straight into each series' buckets.

    The first observation of a series goes through aioprometheus; later ones
    go to the bucket object it made for that series, skipping the label
    handling that costs more than the observation itself.
    """

    __slots__ = ("_buckets", "_histogram", "_names")

    def __init__(self, histogram: Histogram, names: tuple[str, ...] = ()) -> None:
        self._histogram = histogram
        self._names = names
        self._buckets: dict[tuple[str, ...], HistogramValue] = {}

    def observe(self, value: float, values: tuple[str, ...] = ()) -> None:
        """Observe ``value`` in the series with these label values."""
        buckets = self._buckets.get(values)
        if buckets is None:
            labels = dict(zip(self._names, values, strict=True))
            self._histogram.observe(labels, value)
            self._buckets[values] = cast(
                HistogramValue, self._histogram.get_value(labels)
            )
            return
        buckets.observe(value)


class Metrics:
    """The collectors of one app and what feeds them.

    ``exchange_dir`` enables the exchange of values between worker
    processes (see the module docstring); None serves this process alone.
    """

    def __init__(self, exchange_dir: Path | None = None) -> None:
        self.collectors = Collectors(Registry())
        self.exchange = None if exchange_dir is None else WorkerExchange(exchange_dir)
        self._start_time = process_start_time()
        collectors = self.collectors
        collectors.build_info.set(
            {"version": __version__, "python_version": platform.python_version()}, 1
        )
        for kind in ERROR_KINDS:
            collectors.redis_errors.set({"kind": kind}, 0)
        for counter in (
            collectors.keys_written,
            collectors.keys_read,
            collectors.key_misses,
            collectors.keys_expired_on_read,
            collectors.keys_deleted,
            collectors.bytes_written,
            collectors.bytes_read,
        ):
            counter.set({}, 0)
        collectors.redis_up.set({}, 0)
        self.requests = Tally(collectors.requests, ("method", "route", "status"))
        self.request_duration = FastHistogram(
            collectors.request_duration, ("method", "route", "status")
        )
        self.redis_duration = FastHistogram(collectors.redis_duration, ("operation",))
        self.keys_written = Tally(collectors.keys_written)
        self.keys_read = Tally(collectors.keys_read)
        self.key_misses = Tally(collectors.key_misses)
        self.bytes_written = Tally(collectors.bytes_written)
        self.bytes_read = Tally(collectors.bytes_read)
        self._tallies = (
            self.requests,
            self.keys_written,
            self.keys_read,
            self.key_misses,
            self.bytes_written,
            self.bytes_read,
        )
        self.read_process()

    def observe_request(
        self, method: str, route: str, status: int, seconds: float
    ) -> None:
        """Count and time one answered request (a ``RequestObserver``)."""
        values = (method if method in METHODS else "other", route, str(status))
        self.requests.add(1, values)
        self.request_duration.observe(seconds, values)

    def fold(self) -> None:
        """Bring every counter up to date with the pending counts."""
        for tally in self._tallies:
            tally.fold()

    def read_process(self) -> None:
        """Read this process's CPU time, memory and open files."""
        collectors = self.collectors
        collectors.start_time.set({}, self._start_time)
        collectors.cpu.set({}, time.process_time())
        memory = resident_memory()
        if memory is not None:
            collectors.memory.set({}, memory)
        open_fds = count_open_fds()
        if open_fds is not None:
            collectors.open_fds.set({}, open_fds)

    def read_pool(self, store: Store) -> None:
        """Read the pool's use and the count of reads that met expired keys."""
        stats: PoolStats = store.pool_stats()
        pool = self.collectors.pool_connections
        pool.set({"state": "in_use"}, stats.in_use)
        pool.set({"state": "idle"}, stats.idle)
        self.collectors.pool_max.set({}, stats.limit)
        self.collectors.keys_expired_on_read.set({}, store.expired_reads())

    async def check_redis(self, store: Store) -> None:
        """Set ``kvstore_redis_up`` from a PING of Redis."""
        try:
            await store.ping()
        except StoreError:
            self.collectors.redis_up.set({}, 0)
        else:
            self.collectors.redis_up.set({}, 1)

    def snapshot(self) -> Snapshot:
        """This process's current values, as plain JSON-ready data."""
        self.fold()
        return snapshot_registry(self.collectors.registry)

    async def scrape(self, store: Store) -> tuple[bytes, dict[str, str]]:
        """The text exposition of the whole server's metrics, and its headers.

        Raises ``MetricsUnavailableError`` when another worker does not
        answer in time.
        """
        self.read_process()
        self.read_pool(store)
        await self.check_redis(store)
        self.fold()
        if self.exchange is None:
            self.collectors.worker_processes.set({}, 1)
            registry = self.collectors.registry
        else:
            peers, finals = await self.exchange.gather()
            self.collectors.worker_processes.set({}, 1 + len(peers))
            registry = merge_snapshots(self.snapshot(), peers, finals)
        body, headers = render(registry, [])
        return body, headers


class InstrumentedStore:
    """A ``Store`` that times every call and counts keys and bytes.

    Latency is measured per call as the routes see it: waiting for a pooled
    connection, retries and the round trip. A wildcard read is timed per
    batch (one or more SCAN and MGET round trips), plus the last step that
    finds the scan complete.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics
        self._collectors = metrics.collectors

    def _timed(self, operation: str) -> "_Timer":
        return _Timer(self._metrics, operation)

    async def get(self, key: str) -> Entry | None:
        """See ``Store.get``."""
        with self._timed("get"):
            entry = await self.inner.get(key)
        if entry is None:
            self._metrics.key_misses.add(1)
        else:
            self._metrics.keys_read.add(1)
            self._metrics.bytes_read.add(len(entry.value))
        return entry

    async def head(self, key: str) -> Meta | None:
        """See ``Store.head``."""
        with self._timed("head"):
            meta = await self.inner.head(key)
        if meta is None:
            self._metrics.key_misses.add(1)
        else:
            self._metrics.keys_read.add(1)
        return meta

    async def put(self, key: str, value: bytes, expire_in: int | None) -> bool:
        """See ``Store.put``."""
        with self._timed("put"):
            created = await self.inner.put(key, value, expire_in)
        self._metrics.keys_written.add(1)
        self._metrics.bytes_written.add(len(value))
        return created

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """See ``Store.put_many``."""
        with self._timed("put_many"):
            await self.inner.put_many(pairs, expire_in)
        self._metrics.keys_written.add(len(pairs))
        self._metrics.bytes_written.add(sum(map(len, pairs.values())))

    async def delete(self, key: str) -> bool:
        """See ``Store.delete``."""
        with self._timed("delete"):
            removed = await self.inner.delete(key)
        if removed:
            self._collectors.keys_deleted.inc({})
        return removed

    async def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        """See ``Store.scan``; the number of keys returned is observed at the end."""
        batches = self.inner.scan(glob)
        returned = 0
        try:
            while True:
                with self._timed("scan"):
                    batch = await anext(batches, None)
                if batch is None:
                    return
                returned += len(batch)
                self._metrics.bytes_read.add(sum(len(value) for _, value in batch))
                yield batch
        finally:
            self._metrics.keys_read.add(returned)
            self._collectors.wildcard_keys.observe({}, returned)
            await _close(batches)

    async def delete_matching(self, glob: str | None) -> int:
        """See ``Store.delete_matching``."""
        with self._timed("delete_matching"):
            removed = await self.inner.delete_matching(glob)
        self._collectors.keys_deleted.add({}, removed)
        return removed

    async def ping(self) -> None:
        """See ``Store.ping``."""
        with self._timed("ping"):
            await self.inner.ping()

    def pool_stats(self) -> PoolStats:
        """See ``Store.pool_stats``."""
        return self.inner.pool_stats()

    def expired_reads(self) -> int:
        """See ``Store.expired_reads``."""
        return self.inner.expired_reads()

    async def aclose(self) -> None:
        """See ``Store.aclose``."""
        await self.inner.aclose()


class _Timer:
    """Observe a store call's duration, and its failure by kind."""

    __slots__ = ("_metrics", "_operation", "_started")

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._metrics = metrics
        self._operation = (operation,)

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._started
        self._metrics.redis_duration.observe(elapsed, self._operation)
        if isinstance(exc, StoreError):
            self._metrics.collectors.redis_errors.inc({"kind": exc.kind})


async def _close(batches: AsyncIterator[list[tuple[str, bytes]]]) -> None:
    if isinstance(batches, AsyncGenerator):
        await batches.aclose()


class WorkerExchange:
    """Hands this worker's values to the others, and gathers theirs.

    Each worker listens on ``<directory>/<worker id>.sock`` and answers every
    connection with its snapshot as JSON. When it stops it writes its final
    snapshot to ``<worker id>.json``, where later scrapes still count it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.worker_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.socket_path = directory / f"{self.worker_id}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self, metrics: Metrics, holder: StoreHolder) -> None:
        """Listen for other workers' requests for this worker's values."""

        async def answer(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            metrics.read_process()
            metrics.read_pool(holder.store)
            with contextlib.suppress(ConnectionError):
                writer.write(orjson.dumps(metrics.snapshot()))
                await writer.drain()
            writer.close()

        self.directory.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(
            answer, path=str(self.socket_path)
        )

    async def stop(self, final: Snapshot) -> None:
        """Stop listening and leave the final counters behind."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.socket_path.unlink(missing_ok=True)
        written = self.directory / f"{self.worker_id}.json.tmp"
        written.write_bytes(orjson.dumps(final))
        written.replace(self.directory / f"{self.worker_id}.json")

    async def gather(self) -> tuple[list[Snapshot], list[Snapshot]]:
        """The snapshots of the other running workers, and of exited ones.

        A socket nobody listens on belongs to a worker that died without
        stopping; it is removed. Raises ``MetricsUnavailableError`` when a
        running worker does not answer within ``PEER_TIMEOUT``.
        """
        sockets = [
            path for path in self.directory.glob("*.sock") if path != self.socket_path
        ]
        answers = await asyncio.gather(*(self._ask(path) for path in sockets))
        peers = [answer for answer in answers if answer is not None]
        finals = [
            orjson.loads(path.read_bytes())
            for path in sorted(self.directory.glob("*.json"))
        ]
        return peers, finals

    async def _ask(self, path: Path) -> Snapshot | None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = await reader.read()
                finally:
                    # Also when the worker does not answer in time, or the
                    # socket is left for the garbage collector to warn about.
                    writer.close()
        except (ConnectionRefusedError, FileNotFoundError):
            _remove(path)
            return None
        except TimeoutError:
            log.warning(
                "a worker did not hand over its metrics", extra={"socket": str(path)}
            )
            raise MetricsUnavailableError(
                "a worker process did not hand over its metrics in time"
            ) from None
        try:
            snapshot: Snapshot = orjson.loads(data)
        except orjson.JSONDecodeError:
            # The worker stopped halfway through its answer.
            raise MetricsUnavailableError(
                "a worker process stopped while handing over its metrics"
            ) from None
        return snapshot


def clear_exchange_dir(directory: Path) -> None:
    """Create ``directory``, or remove what an earlier server left in it."""
    directory.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.sock", "*.json", "*.json.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def snapshot_registry(registry: Registry) -> Snapshot:
    """The values of every collector of ``registry``."""
    snapshot: Snapshot = {}
    for collector in registry.get_all():
        samples: list[list[Any]] = []
        for labels, value in collector.get_all():
            if isinstance(collector, Histogram):
                parts = cast(dict[float | str, float], value)
                buckets = [parts[bound] for bound in parts if isinstance(bound, float)]
                samples.append([labels, [buckets, parts["sum"], parts["count"]]])
            else:
                samples.append([labels, value])
        snapshot[collector.name] = samples
    return snapshot


def merge_snapshots(
    local: Snapshot, peers: list[Snapshot], finals: list[Snapshot]
) -> Registry:
    """One registry holding the whole server's values.

    Counters and histograms add up over every worker, exited ones included.
    Gauges combine over running workers as ``GAUGE_MERGE`` says.
    """
    merged = Collectors(Registry())
    running = [local, *peers]
    for collector in merged.registry.get_all():
        name = collector.name
        if isinstance(collector, Histogram):
            _merge_histograms(collector, [*running, *finals])
        elif isinstance(collector, Counter):
            for labels, total in _sum_values(name, [*running, *finals]).values():
                collector.set(labels, total)
        elif isinstance(collector, Gauge):
            _merge_gauges(collector, GAUGE_MERGE.get(name, "sum"), local, running)
    return merged.registry


def _sum_values(
    name: str, snapshots: list[Snapshot]
) -> dict[bytes, tuple[dict[str, str], float]]:
    totals: dict[bytes, tuple[dict[str, str], float]] = {}
    for snapshot in snapshots:
        for labels, value in snapshot.get(name, []):
            key = _label_key(labels)
            _, total = totals.get(key, (labels, 0))
            totals[key] = (labels, total + value)
    return totals


def _merge_gauges(
    gauge: Gauge, how: GaugeMerge, local: Snapshot, running: list[Snapshot]
) -> None:
    if how == "local":
        for labels, value in local.get(gauge.name, []):
            gauge.set(labels, value)
        return
    values: dict[bytes, tuple[dict[str, str], list[float]]] = {}
    for snapshot in running:
        for labels, value in snapshot.get(gauge.name, []):
            values.setdefault(_label_key(labels), (labels, []))[1].append(value)
    for labels, found in values.values():
        if how == "min":
            gauge.set(labels, min(found))
        elif how == "max":
            gauge.set(labels, max(found))
        else:
            gauge.set(labels, sum(found))


def _merge_histograms(histogram: Histogram, snapshots: list[Snapshot]) -> None:
    bounds = tuple(histogram.upper_bounds)
    merged: dict[bytes, tuple[dict[str, str], HistogramValue]] = {}
    for snapshot in snapshots:
        for labels, (buckets, total, count) in snapshot.get(histogram.name, []):
            key = _label_key(labels)
            if key not in merged:
                merged[key] = (labels, HistogramValue(*bounds))
            value = merged[key][1]
            for bound, bucket_count in zip(value.buckets, buckets, strict=True):
                value.buckets[bound] += bucket_count
            value.sum += total
            value.observations += count
    for labels, value in merged.values():
        histogram.set_value(labels, value)


def _label_key(labels: dict[str, str]) -> bytes:
    return orjson.dumps(labels, option=orjson.OPT_SORT_KEYS)


def process_start_time() -> float:
    """When this process started, in seconds since the epoch.

    Read from ``/proc`` where it exists; elsewhere the time of this call,
    which comes moments after the start.
    """
    try:
        stat = Path("/proc/self/stat").read_bytes()
        boot = Path("/proc/stat").read_bytes()
    except OSError:
        return time.time()
    ticks = int(stat.rpartition(b")")[2].split()[19])
    boot_time = next(
        int(line.split()[1]) for line in boot.splitlines() if line.startswith(b"btime")
    )
    return boot_time + ticks / os.sysconf("SC_CLK_TCK")


def resident_memory() -> int | None:
    """The process's resident memory in bytes, or None where ``/proc`` is absent."""
    try:
        statm = Path("/proc/self/statm").read_bytes()
    except OSError:
        return None
    return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_open_fds() -> int | None:
    """How many file descriptors the process has open, or None if unknown."""
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return None


def install_metrics(app: Quart, settings: Settings, holder: StoreHolder) -> Metrics:
    """Serve ``/metrics`` and instrument the store the app serves from.

    With ``settings.metrics_bind`` set, ``/metrics`` answers only on that
    listener's port, and nothing else does. The caller adds
    ``Metrics.observe_request`` to the app's request observers.
    """
    metrics = Metrics(settings.metrics_dir)
    blueprint = Blueprint("metrics", __name__)

    @blueprint.route("/metrics", methods=["GET"])
    async def scrape() -> Response:
        body, headers = await metrics.scrape(holder.store)
        return Response(body, headers=headers)

    @app.before_serving
    async def instrument_store() -> None:
        if not isinstance(holder.store, InstrumentedStore):
            holder.store = InstrumentedStore(holder.store, metrics)
        if metrics.exchange is not None:
            await metrics.exchange.start(metrics, holder)

    @app.after_serving
    async def leave_final_counts() -> None:
        if metrics.exchange is not None:
            metrics.read_process()
            await metrics.exchange.stop(metrics.snapshot())

    if settings.metrics_bind is not None:
        metrics_port = tcp_port(settings.metrics_bind)

        @app.before_request
        async def keep_listeners_apart() -> None:
            server = request.scope.get("server")
            on_metrics_port = server is not None and server[1] == metrics_port
            if on_metrics_port != (request.endpoint == "metrics.scrape"):
                raise NotFound()

    app.register_blueprint(blueprint)
    app.extensions["kvstore.metrics"] = metrics
    return metrics
