"""Running scenarios: the servers they need and one measurement per target.

`Suite` owns everything the run starts: the private Redis, the delay proxy
and the HTTP targets (started lazily, once per network path, and stopped
together at the end). `Suite.measure` runs one scenario against one target
and returns a `Measurement` with throughput, latency, failures, CPU time
per request from /proc and resident memory per process.
"""

import http.client
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from redis import Redis

from bench.dataset import Dataset, delete_matching, glob_for, read_matching
from bench.loadgen import LoadResult, run_httpload, run_redis_benchmark, run_wrk
from bench.procs import (
    LOOPBACK,
    Child,
    OtherLoad,
    PeakRssSampler,
    own_rss,
    tree_rss,
)
from bench.scenarios import FLOOR, REDIS_BENCHMARK, Kind, Scenario
from bench.targets import (
    DelayProxyServer,
    HttpServer,
    RedisServer,
    ServerSettings,
    new_api_token,
    start_server,
)

log = logging.getLogger(__name__)

# A server using less than this share of a core over one interval is idle.
IDLE_CORES = 0.05
SETTLE_INTERVAL = 0.2

MEBIBYTE = 1024 * 1024
PING_SAMPLES = 300
CALIBRATION_ATTEMPTS = 4
CALIBRATION_TOLERANCE_MS = 0.05
# A bulk read of a million keys takes seconds; this only guards against hangs.
BULK_TIMEOUT = 600.0


@dataclass(frozen=True)
class SuiteConfig:
    """Run-wide settings for the measurements."""

    duration: int
    warmup: int
    timeout: float
    max_requests: int
    redis_requests: int
    workers: int
    backlog: int
    key_prefix: str
    delay_ms: float
    calibrate_delay: bool
    log_dir: Path
    kvstore_env: tuple[tuple[str, str], ...] = ()


@dataclass
class Measurement:
    """One target's figures for one scenario in one round."""

    scenario: str
    target: str
    round_index: int
    tool: str = ""
    connections: int = 0
    requests: int = 0
    duration_s: float = 0.0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    status_errors: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    capped: bool = False
    cpu_us_per_request: float | None = None
    backend_cpu_us_per_request: float | None = None
    rss_mb: list[float] = field(default_factory=list)
    wall_ms: float | None = None
    peak_rss_mb: float | None = None
    base_rss_mb: float | None = None
    items: int | None = None
    # CPU cores busy with work outside the benchmark during the run.
    other_cores: float | None = None
    note: str = ""


def _mebibytes(sizes: list[int]) -> list[float]:
    return [round(size / MEBIBYTE, 1) for size in sizes]


def measure_ping_ms(port: int, samples: int = PING_SAMPLES) -> float:
    """Return the median PING round trip to 127.0.0.1:`port` in milliseconds."""
    client = Redis(host=LOOPBACK, port=port)
    try:
        client.ping()
        times: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return statistics.median(times) * 1000


class Suite:
    """The servers of one benchmark run and the means to measure them."""

    def __init__(self, config: SuiteConfig) -> None:
        self.config = config
        self.redis = RedisServer(config.log_dir)
        self.proxy: DelayProxyServer | None = None
        self._servers: dict[tuple[str, bool], HttpServer] = {}
        self._client: Redis | None = None
        self._dataset: Dataset | None = None
        self.round_trips_ms: dict[str, float] = {}
        self.proxy_delay_ms: float | None = None
        self.api_token = new_api_token()

    def __enter__(self) -> Self:
        self.redis.start()
        self._client = self.redis.client()
        self._dataset = Dataset(self._client, self.config.key_prefix)
        self.round_trips_ms["direct"] = measure_ping_ms(self.redis.port)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for server in self._servers.values():
            server.child.stop()
        self._servers.clear()
        if self.proxy is not None:
            self.proxy.stop()
        if self._client is not None:
            self._client.close()
        self.redis.stop()

    @property
    def client(self) -> Redis:
        """A synchronous client of the benchmark's Redis."""
        if self._client is None:
            raise RuntimeError("the suite is not running")
        return self._client

    @property
    def dataset(self) -> Dataset:
        """The data set manager of the benchmark's Redis."""
        if self._dataset is None:
            raise RuntimeError("the suite is not running")
        return self._dataset

    def _start_proxy(self) -> DelayProxyServer:
        if self.proxy is not None:
            return self.proxy

        # The proxy's own forwarding (a Python event loop waking on timers)
        # adds a little to each direction. With calibration on, the per-chunk
        # delay is trimmed until the added round trip at rest is what was
        # asked for: twice the configured one-way delay.
        wanted = 2 * self.config.delay_ms
        delay = self.config.delay_ms
        proxy, added = self._open_proxy(delay)
        attempts = CALIBRATION_ATTEMPTS if self.config.calibrate_delay else 1
        for _ in range(attempts - 1):
            if abs(added - wanted) <= CALIBRATION_TOLERANCE_MS:
                break
            proxy.stop()
            delay = max(0.0, delay - (added - wanted) / 2)
            proxy, added = self._open_proxy(delay)
        self.proxy = proxy
        self.proxy_delay_ms = delay
        self.round_trips_ms["delayed"] = self.round_trips_ms["direct"] + added
        return proxy

    def _open_proxy(self, delay: float) -> tuple[DelayProxyServer, float]:
        """Start a proxy; return it and the round trip it adds, in ms."""
        proxy = DelayProxyServer(self.redis.port, delay, self.config.log_dir)
        proxy.start()
        proxied = measure_ping_ms(proxy.port)
        added = proxied - self.round_trips_ms["direct"]
        log.info(
            "proxy delay %.3f ms each way: round trip %.3f ms (%.3f ms added)",
            delay,
            proxied,
            added,
        )
        return proxy, added

    def server(self, name: str, delayed: bool) -> HttpServer:
        """Return target `name`, starting it if needed.

        Servers for the other network path are stopped first, so that idle
        servers do not hold memory and connections during measurements.
        Behind the delay proxy only one server runs at a time: the proxy
        holds a limited number of connections, and idle pools would take
        them from the target being measured.
        """
        key = (name, delayed)
        if key in self._servers:
            return self._servers[key]

        self._stop_servers(delayed=not delayed)
        if delayed:
            self._stop_servers(delayed=True)
        redis_url = self._start_proxy().url if delayed else self.redis.url
        settings = ServerSettings(
            redis_url=redis_url,
            key_prefix=self.config.key_prefix,
            workers=self.config.workers,
            backlog=self.config.backlog,
            log_dir=self.config.log_dir,
            kvstore_env=self.config.kvstore_env,
            api_token=self.api_token,
        )
        label = "delayed" if delayed else "direct"
        server = start_server(name, settings, label)
        self._servers[key] = server
        return server

    def _stop_servers(self, *, delayed: bool) -> None:
        for key in [k for k in self._servers if k[1] == delayed]:
            self._servers.pop(key).child.stop()

    def _proxy_refusals(self) -> int:
        return 0 if self.proxy is None else self.proxy.refusals()

    def _note_refusals(self, measurement: Measurement, before: int) -> None:
        refused = self._proxy_refusals() - before
        if refused:
            message = f"the delay proxy refused {refused} connections"
            measurement.note = "; ".join(filter(None, [measurement.note, message]))

    def _backend(self, delayed: bool) -> list[Child]:
        children = [self.redis.child]
        if delayed and self.proxy is not None:
            children.append(self.proxy.child)
        return children

    def prepare(self, scenario: Scenario) -> None:
        """Load the scenario's data set and start what it needs."""
        self.dataset.ensure(scenario.keys)
        if scenario.delayed:
            self._start_proxy()

    def measure(self, scenario: Scenario, target: str, round_index: int) -> Measurement:
        """Run `scenario` once against `target`."""
        if scenario.kind is Kind.LOAD:
            if target == REDIS_BENCHMARK:
                return self._measure_redis_benchmark(scenario, round_index)
            return self._measure_load(scenario, target, round_index)
        if scenario.kind is Kind.BULK_READ:
            if target == FLOOR:
                return self._measure_read_floor(scenario, round_index)
            return self._measure_http_read(scenario, target, round_index)
        if target == FLOOR:
            return self._measure_delete_floor(scenario, round_index)
        return self._measure_http_delete(scenario, target, round_index)

    def _load_figures(
        self,
        measurement: Measurement,
        result: LoadResult,
        cpu_seconds: float,
        backend_seconds: float,
    ) -> None:
        measurement.tool = result.tool
        measurement.requests = result.requests
        measurement.duration_s = round(result.duration_s, 3)
        measurement.rps = round(result.rps, 1)
        measurement.p50_ms = result.latency.p50
        measurement.p99_ms = result.latency.p99
        measurement.p999_ms = result.latency.p999
        measurement.status_errors = result.errors.status
        measurement.socket_errors = result.errors.socket
        measurement.timeouts = result.errors.timeout
        measurement.capped = result.capped
        if not result.requests:
            measurement.note = "no request completed"
        else:
            per_request = 1e6 / result.requests
            measurement.cpu_us_per_request = round(cpu_seconds * per_request, 1)
            measurement.backend_cpu_us_per_request = round(
                backend_seconds * per_request, 1
            )

    def _measure_load(
        self, scenario: Scenario, target: str, round_index: int
    ) -> Measurement:
        server = self.server(target, scenario.delayed)
        backend = self._backend(scenario.delayed)
        config = self.config

        def load(duration: int) -> LoadResult:
            if scenario.driver == "httpload":
                return run_httpload(
                    server.url,
                    str(scenario.script_options["method"]),
                    keys=scenario.keys,
                    connections=scenario.connections,
                    duration=duration,
                    timeout=config.timeout,
                    max_requests=config.max_requests,
                    token=self.api_token,
                )
            return run_wrk(
                server.url,
                scenario.script,
                connections=scenario.connections,
                duration=duration,
                timeout=config.timeout,
                max_requests=config.max_requests,
                options={**scenario.script_options, "token": self.api_token},
            )

        if config.warmup > 0:
            load(config.warmup)
            _settle(server.child)
        refused = self._proxy_refusals()
        other = OtherLoad()
        cpu_before = server.child.cpu_seconds()
        backend_before = sum(child.cpu_seconds() for child in backend)
        result = load(config.duration)
        cpu = server.child.cpu_seconds() - cpu_before
        backend_cpu = sum(child.cpu_seconds() for child in backend) - backend_before
        other_cores = other.cores(cpu + backend_cpu)
        server.child.check_alive()

        measurement = Measurement(
            scenario.name, target, round_index, connections=scenario.connections
        )
        self._load_figures(measurement, result, cpu, backend_cpu)
        measurement.other_cores = round(other_cores, 2)
        self._note_refusals(measurement, refused)
        measurement.rss_mb = _mebibytes(server.child.rss_bytes())
        return measurement

    def _measure_redis_benchmark(
        self, scenario: Scenario, round_index: int
    ) -> Measurement:
        backend = self._backend(scenario.delayed)
        port = self.proxy.port if scenario.delayed and self.proxy else self.redis.port
        if scenario.delayed:
            self._stop_servers(delayed=True)
        # Multi-key commands do more per request, so fewer requests keep the
        # run about as long as the single-key ones.
        keys_per_request = max(1, (len(scenario.redis_command) - 1) // 2)
        requests = max(1000, self.config.redis_requests // keys_per_request)
        if scenario.delayed:
            requests = max(1000, requests // 10)

        refused = self._proxy_refusals()
        other = OtherLoad()
        cpu_before = sum(child.cpu_seconds() for child in backend)
        result = run_redis_benchmark(
            port,
            scenario.redis_command,
            connections=scenario.connections,
            requests=requests,
            keyspace=scenario.keys,
        )
        cpu = sum(child.cpu_seconds() for child in backend) - cpu_before
        other_cores = other.cores(cpu)

        measurement = Measurement(
            scenario.name,
            REDIS_BENCHMARK,
            round_index,
            connections=scenario.connections,
        )
        self._load_figures(measurement, result, cpu, cpu)
        measurement.other_cores = round(other_cores, 2)
        self._note_refusals(measurement, refused)
        measurement.rss_mb = _mebibytes(
            [size for child in backend for size in child.rss_bytes()]
        )
        return measurement

    def _http_call(
        self, server: HttpServer, method: str, path: str, measurement: Measurement
    ) -> bytes:
        """Make one timed request, sampling the server's memory meanwhile."""
        connection = http.client.HTTPConnection(
            LOOPBACK, server.port, timeout=BULK_TIMEOUT
        )
        cpu_before = server.child.cpu_seconds()
        backend_before = self.redis.child.cpu_seconds()
        try:
            with PeakRssSampler(tree_rss([server.child])) as sampler:
                started = time.perf_counter()
                connection.request(method, path, headers=self._auth_headers())
                response = connection.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - started
        finally:
            connection.close()

        measurement.wall_ms = round(elapsed * 1000, 2)
        measurement.cpu_us_per_request = round(
            (server.child.cpu_seconds() - cpu_before) * 1e6, 1
        )
        measurement.backend_cpu_us_per_request = round(
            (self.redis.child.cpu_seconds() - backend_before) * 1e6, 1
        )
        measurement.peak_rss_mb = round(sampler.peak_bytes / MEBIBYTE, 1)
        measurement.base_rss_mb = round(sampler.baseline_bytes / MEBIBYTE, 1)
        measurement.requests = 1
        if not 200 <= response.status < 300:
            measurement.status_errors = 1
            measurement.note = f"HTTP {response.status}: {body[:200]!r}"
        return body

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"}

    def _measure_http_read(
        self, scenario: Scenario, target: str, round_index: int
    ) -> Measurement:
        server = self.server(target, scenario.delayed)
        path = "/keys?filter=" + quote(scenario.id_prefix + "$", safe="")
        runs: list[Measurement] = []
        for _ in range(scenario.repeats):
            measurement = Measurement(scenario.name, target, round_index, "http")
            body = self._http_call(server, "GET", path, measurement)
            if not measurement.status_errors:
                measurement.items = _count_pairs(body)
                if measurement.items != scenario.keys:
                    measurement.note = (
                        f"expected {scenario.keys} pairs, got {measurement.items}"
                    )
            runs.append(measurement)
        server.child.check_alive()
        result = _median_run(runs)
        result.rss_mb = _mebibytes(server.child.rss_bytes())
        return result

    def _measure_read_floor(self, scenario: Scenario, round_index: int) -> Measurement:
        pattern = glob_for(self.config.key_prefix, scenario.id_prefix)
        runs: list[Measurement] = []
        for _ in range(scenario.repeats):
            measurement = Measurement(scenario.name, FLOOR, round_index, "redis-py")
            backend_before = self.redis.child.cpu_seconds()
            cpu_before = time.process_time()
            with PeakRssSampler(own_rss) as sampler:
                started = time.perf_counter()
                count, _ = read_matching(self.client, self.config.key_prefix, pattern)
                elapsed = time.perf_counter() - started
            measurement.wall_ms = round(elapsed * 1000, 2)
            measurement.cpu_us_per_request = round(
                (time.process_time() - cpu_before) * 1e6, 1
            )
            measurement.backend_cpu_us_per_request = round(
                (self.redis.child.cpu_seconds() - backend_before) * 1e6, 1
            )
            measurement.peak_rss_mb = round(sampler.peak_bytes / MEBIBYTE, 1)
            measurement.base_rss_mb = round(sampler.baseline_bytes / MEBIBYTE, 1)
            measurement.requests = 1
            measurement.items = count
            runs.append(measurement)
        return _median_run(runs)

    def _measure_http_delete(
        self, scenario: Scenario, target: str, round_index: int
    ) -> Measurement:
        server = self.server(target, scenario.delayed)
        self.dataset.ensure(scenario.keys)
        measurement = Measurement(scenario.name, target, round_index, "http")
        body = self._http_call(server, "DELETE", "/keys", measurement)
        self.dataset.invalidate()
        server.child.check_alive()
        if not measurement.status_errors:
            measurement.items = _deleted_count(body)
            if measurement.items != scenario.keys:
                measurement.note = (
                    f"expected {scenario.keys} deleted, got {measurement.items}"
                )
        measurement.rss_mb = _mebibytes(server.child.rss_bytes())
        return measurement

    def _measure_delete_floor(
        self, scenario: Scenario, round_index: int
    ) -> Measurement:
        self.dataset.ensure(scenario.keys)
        measurement = Measurement(scenario.name, FLOOR, round_index, "redis-py")
        pattern = glob_for(self.config.key_prefix, "")
        backend_before = self.redis.child.cpu_seconds()
        cpu_before = time.process_time()
        started = time.perf_counter()
        measurement.items = delete_matching(self.client, pattern)
        measurement.wall_ms = round((time.perf_counter() - started) * 1000, 2)
        measurement.cpu_us_per_request = round(
            (time.process_time() - cpu_before) * 1e6, 1
        )
        measurement.backend_cpu_us_per_request = round(
            (self.redis.child.cpu_seconds() - backend_before) * 1e6, 1
        )
        measurement.requests = 1
        self.dataset.invalidate()
        return measurement


def _count_pairs(body: bytes) -> int | None:
    """Count the pairs in a bulk read's JSON object; None if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return len(data) if isinstance(data, dict) else None


def _deleted_count(body: bytes) -> int | None:
    """Read ``{"deleted": n}``; None if the body has another shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("deleted"), int):
        deleted: int = data["deleted"]
        return deleted
    return None


def _median_run(runs: list[Measurement]) -> Measurement:
    """Return the run with the median wall time, failures summed over all."""
    ordered = sorted(runs, key=lambda run: run.wall_ms or 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.status_errors = sum(run.status_errors for run in runs)
    chosen.note = "; ".join(sorted({run.note for run in runs if run.note}))
    chosen.requests = len(runs)
    return chosen


def _settle(server: Child, limit: float = 10.0) -> None:
    """Wait until `server` is idle, at most `limit` seconds.

    When wrk's warm-up run ends, its requests still in flight (hundreds at
    high connection counts) are still being served; measuring at once would
    queue the measured requests behind them.
    """
    deadline = time.monotonic() + limit
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL)
        now = server.cpu_seconds()
        if now - before < SETTLE_INTERVAL * IDLE_CORES:
            return
        before = now
