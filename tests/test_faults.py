"""Faults of the data tier, against real redis-server processes.

Each test starts its own Redis on a free port and, where it needs one, its
own ``kvstore serve``; then it kills, pauses, freezes or restarts that
Redis while requests are running and checks what clients saw.
"""

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h11
import httpx
import orjson
import pytest
import redis
from quart import Quart

from kvstore.app import create_app
from kvstore.embedded import EmbeddedRedis
from kvstore.settings import Settings
from kvstore.store import RedisStore, Store, StoreTimeoutError
from tests.helpers import need_redis_7
from tests.services import Service, Traffic, report, running, start_redis

pytestmark = pytest.mark.slow

# What a request may take beyond the Redis deadline: HTTP, scheduling on a
# busy two-core machine, and the last backoff before giving up.
MARGIN = 1.5


async def test_redis_outage_answers_503_in_time_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    redis_server = start_redis(tmp_path / "redis")
    timeout = 1.0
    settings = {"REDIS_URL": redis_server.url, "REDIS_TIMEOUT": str(timeout)}
    try:
        with running(tmp_path / "kvstore.log", settings) as service:
            async with (
                httpx.AsyncClient(base_url=service.url, timeout=30) as probe,
                Traffic(service.url, clients=4) as traffic,
            ):
                await asyncio.sleep(1.0)
                killed = time.monotonic()
                redis_server.kill()
                await asyncio.sleep(0.5)
                ready_down = await probe.get("/readyz")
                health_down = await probe.get("/healthz")
                await asyncio.sleep(2.0)
                restarted = time.monotonic()
                await asyncio.to_thread(redis_server.start)
                await asyncio.sleep(1.5)
                ready_up = await probe.get("/readyz")
    finally:
        redis_server.stop()

    samples = traffic.samples
    recovered = traffic.first_success_after(restarted)
    outage = [s for s in samples if killed <= s.started < (recovered or restarted)]
    after = [s for s in samples if recovered is not None and s.started > recovered]
    unavailable = [s for s in samples if s.status == 503]
    longest = max(s.elapsed for s in outage)
    report(
        "redis-outage",
        requests=len(samples),
        answered_503=len(unavailable),
        transport_errors=sum(s.status is None for s in samples),
        longest_wait_in_outage_s=round(longest, 3),
        outage_s=round(restarted - killed, 2),
        recovery_after_restart_s=round((recovered or 0) - restarted, 3),
        redis_timeout_s=timeout,
        restarts=1,
    )
    assert [s.error for s in samples if s.status is None] == []
    assert {s.status for s in samples} <= {200, 201, 404, 503}
    assert len(unavailable) >= 10
    for sample in unavailable:
        assert sample.content_type == "application/problem+json"
        assert sample.retry_after == "1"
        assert orjson.loads(sample.body)["status"] == 503
    assert longest <= timeout + MARGIN
    assert max(s.elapsed for s in samples) <= timeout + MARGIN
    # Keys written before the kill died with that Redis; nothing else may 404.
    for sample in samples:
        if sample.status == 404:
            assert sample.method == "GET"
            assert sample.started >= killed
    assert (ready_down.status_code, health_down.status_code) == (503, 200)
    assert ready_down.headers["Content-Type"] == "application/problem+json"
    assert "Retry-After" in ready_down.headers
    assert recovered is not None
    assert recovered - restarted <= 5.0
    assert len(after) >= 10
    assert {s.status for s in after} <= {200, 201}
    assert ready_up.status_code == 200


@pytest.mark.parametrize("stall", ["client-pause", "debug-sleep", "sigstop"])
async def test_stalled_redis_gives_503_within_deadline_and_frees_the_pool(
    tmp_path: Path, stall: str
) -> None:
    need_redis_7()
    redis_server = start_redis(
        tmp_path / "redis", extra_args=("--enable-debug-command", "local")
    )
    admin = redis.Redis.from_url(redis_server.url)
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix="stall:",
        data_dir=tmp_path,
        redis_timeout=1.0,
        redis_max_connections=8,
    )
    app = create_app(settings)
    try:
        async with app.test_app():
            client = app.test_client()
            store = app.extensions["kvstore.holder"].store
            await client.put("/keys/k", data=b'"v"', headers=JSON)
            peak = PoolPeak(store)
            async with peak:
                stalled = time.monotonic()
                resume = stall_redis(redis_server, admin, stall, seconds=2.5)
                during = await timed_requests(app, 40)
                await asyncio.sleep(max(0.0, stalled + 2.6 - time.monotonic()))
                resume()
                await asyncio.sleep(0.2)
                after = await timed_requests(app, 40)
            in_use_after = store.pool_stats().in_use
    finally:
        admin.close()
        redis_server.stop()

    report(
        f"redis-stall-{stall}",
        requests=len(during) + len(after),
        answered_503=sum(status == 503 for status, _, _ in during),
        longest_wait_s=round(max(elapsed for _, _, elapsed in during), 3),
        pool_peak=peak.in_use,
        pool_limit=8,
    )
    assert {status for status, _, _ in during} == {503}
    assert {retry for _, retry, _ in during} == {"1"}
    assert max(elapsed for _, _, elapsed in during) <= 1.0 + MARGIN
    assert {status for status, _, _ in after} == {200}
    assert 0 < peak.in_use <= 8
    assert not peak.over_limit
    assert in_use_after == 0


JSON = {"Content-Type": "application/json"}


def stall_redis(
    server: EmbeddedRedis, admin: redis.Redis, how: str, seconds: float
) -> Callable[[], None]:
    """Stall Redis for ``seconds``; return what ends the stall early."""
    if how == "client-pause":
        admin.client_pause(int(seconds * 1000), all=True)
        return lambda: None
    if how == "debug-sleep":
        # DEBUG SLEEP blocks the whole server, its caller included.
        sleeper = threading.Thread(
            target=admin.execute_command, args=("DEBUG", "SLEEP", str(seconds))
        )
        sleeper.start()
        wait_until_unresponsive(server.url)
        return sleeper.join
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    process = server.process
    return lambda: process.send_signal(signal.SIGCONT)


def wait_until_unresponsive(url: str, timeout: float = 5.0) -> None:
    """Return once a PING to ``url`` goes unanswered for a tenth of a second."""
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url, socket_timeout=0.1) as probe:
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except redis.TimeoutError:
                return
            time.sleep(0.01)
    raise AssertionError(f"Redis at {url} still answers after {timeout} s")


async def timed_requests(app: Quart, count: int) -> list[tuple[int, str | None, float]]:
    """GET /keys/k ``count`` times at once: status, Retry-After, seconds."""

    async def one() -> tuple[int, str | None, float]:
        started = time.monotonic()
        response = await app.test_client().get("/keys/k")
        elapsed = time.monotonic() - started
        return response.status_code, response.headers.get("Retry-After"), elapsed

    return await asyncio.gather(*(one() for _ in range(count)))


class PoolPeak:
    """Samples a store's pool every few milliseconds; keeps the most in use."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.in_use = 0
        self.over_limit = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "PoolPeak":
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _sample(self) -> None:
        while True:
            stats = self.store.pool_stats()
            self.in_use = max(self.in_use, stats.in_use)
            if stats.in_use + stats.idle > stats.limit:
                self.over_limit = True
            await asyncio.sleep(0.005)


async def test_every_store_call_ends_at_its_deadline_on_a_frozen_redis(
    tmp_path: Path,
) -> None:
    """Many calls at once, several rounds: none outlives the deadline.

    Calls that connect, wait for the pool or send just as the deadline fires
    are the ones a per-operation socket timeout used to stretch.
    """
    redis_server = start_redis(tmp_path / "redis")
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix="frozen:",
        data_dir=tmp_path,
        redis_timeout=0.3,
        redis_max_connections=8,
    )
    store = RedisStore.from_settings(settings, redis_server.url)
    await store.put("k", b"1", None)
    # The deadline must be the only clock: see RedisStore.from_settings.
    assert store._redis.connection_pool.connection_kwargs["socket_timeout"] is None

    async def timed_get() -> tuple[str, float]:
        started = time.monotonic()
        try:
            await store.get("k")
        except StoreTimeoutError:
            return "timeout", time.monotonic() - started
        return "answer", time.monotonic() - started

    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        rounds = [
            await asyncio.gather(*(timed_get() for _ in range(100))) for _ in range(8)
        ]
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        await store.aclose()
        redis_server.stop()

    outcomes = [outcome for round_ in rounds for outcome in round_]
    report(
        "redis-frozen-deadline",
        calls=len(outcomes),
        deadline_s=0.3,
        longest_call_s=round(max(elapsed for _, elapsed in outcomes), 3),
    )
    assert {kind for kind, _ in outcomes} == {"timeout"}
    assert max(elapsed for _, elapsed in outcomes) <= 0.3 + MARGIN / 2


async def test_writes_acknowledged_before_a_clean_restart_survive_it(
    tmp_path: Path,
) -> None:
    redis_server = start_redis(tmp_path / "redis", persist=True)
    settings = {"REDIS_URL": redis_server.url, "REDIS_TIMEOUT": "1"}
    bulk_acked: dict[str, dict[str, int]] = {}
    deleted: set[str] = set()
    bulk_requests = 0
    try:
        with running(tmp_path / "kvstore.log", settings) as service:
            async with (
                httpx.AsyncClient(base_url=service.url, timeout=30) as http,
                Traffic(service.url, clients=3) as traffic,
            ):

                async def write_bulk_and_delete() -> None:
                    nonlocal bulk_requests
                    for round_ in range(60):
                        bulk_requests += 1
                        pairs = {f"bulk-{round_}-{n}": {"n": n} for n in range(5)}
                        response = await http.put(
                            "/keys?expire_in=3600",
                            content=orjson.dumps(pairs),
                            headers=JSON,
                        )
                        if response.status_code == 200:
                            bulk_acked.update(pairs)
                        if round_ % 3 == 0 and f"bulk-{round_}-0" in bulk_acked:
                            bulk_requests += 1
                            gone = await http.delete(f"/keys/bulk-{round_}-0")
                            if gone.status_code == 204:
                                deleted.add(f"bulk-{round_}-0")
                        await asyncio.sleep(0.03)

                bulk = asyncio.create_task(write_bulk_and_delete())
                await asyncio.sleep(1.0)
                await asyncio.to_thread(redis_server.stop)
                stopped = time.monotonic()
                await asyncio.to_thread(redis_server.start)
                restart_s = time.monotonic() - stopped
                await bulk
        with redis.Redis.from_url(redis_server.url) as check:
            stored = stored_values(check, "kvstore:")
            bulk_ttls = {key: check.ttl(f"kvstore:{key}") for key in bulk_acked}
    finally:
        redis_server.stop()

    single_acked = dict(traffic.acked)
    report(
        "redis-clean-restart",
        requests=len(traffic.samples) + bulk_requests,
        acknowledged_writes=len(single_acked) + len(bulk_acked),
        lost_writes=sum(key not in stored for key in single_acked)
        + sum(key not in stored for key in set(bulk_acked) - deleted),
        restart_s=round(restart_s, 2),
        restarts=1,
    )
    assert len(single_acked) >= 20
    assert len(bulk_acked) >= 50
    for key, number in single_acked.items():
        assert stored.get(key) == str(number).encode()
    for key, pair_value in bulk_acked.items():
        if key in deleted:
            assert key not in stored
        else:
            assert stored.get(key) == orjson.dumps(pair_value)
            assert 0 < bulk_ttls[key] <= 3600
    assert [s.error for s in traffic.samples if s.status is None] == []


def stored_values(client: redis.Redis, prefix: str) -> dict[str, bytes]:
    """Every key under ``prefix`` (prefix removed) and its stored value."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    values = client.mget(keys) if keys else []
    return {
        key.decode().removeprefix(prefix): value
        for key, value in zip(keys, values, strict=True)
        if isinstance(value, bytes)
    }


async def test_sigterm_finishes_in_flight_requests_then_stops_embedded_redis(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    settings = {"DATA_DIR": str(data_dir), "REDIS_TIMEOUT": "5"}
    service = Service(tmp_path / "kvstore.log", settings)
    service.start()
    value = "x" * 200
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            for start in range(0, 40_000, 10_000):
                pairs = {f"big-{n:05}": value for n in range(start, start + 10_000)}
                stored = await http.put(
                    "/keys", content=orjson.dumps(pairs), headers=JSON
                )
                assert stored.status_code == 200
            reading = asyncio.create_task(
                asyncio.to_thread(read_slowly, service.port, "/keys?filter=big-$")
            )
            await asyncio.sleep(0.3)
            with redis.Redis(unix_socket_path=str(data_dir / "redis.sock")) as admin:
                admin.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
            held = asyncio.create_task(
                http.put("/keys/held", content=b'"paused"', headers=JSON)
            )
            held_done: list[float] = []
            held.add_done_callback(lambda _: held_done.append(time.monotonic()))
            await asyncio.sleep(0.3)
            service.signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused_at = await asyncio.to_thread(wait_until_refused, service.port)
            held_response = await held
            [held_at] = held_done
            status, body, read_at = await reading
        exit_code = await asyncio.to_thread(service.wait, 30.0)
    finally:
        service.stop()
    records = service.log_records()
    messages = [record["message"] for record in records]
    redis_pid = next(
        record["pid"]
        for record in records
        if record["message"] == "embedded redis started"
    )
    stopped = next(r for r in records if r["message"] == "embedded redis stopped")

    with running(tmp_path / "again.log", settings) as again:
        async with httpx.AsyncClient(base_url=again.url, timeout=30) as http:
            held_again = await http.get("/keys/held")
            count = await http.delete("/keys", params={"filter": "big-$"})

    # Both requests were still in flight when the signal came, and new
    # connections were refused before either of them finished.
    report(
        "sigterm-drain",
        in_flight=2,
        refused_after_signal_s=round(refused_at - signalled, 3),
        held_write_done_after_signal_s=round(held_at - signalled, 3),
        stream_done_after_signal_s=round(read_at - signalled, 3),
        keys_read_back=count.json()["deleted"] + 1,
        exit_code=exit_code,
    )
    assert signalled < refused_at < held_at
    assert refused_at < read_at
    assert held_response.status_code == 201
    assert status == 200
    assert len(orjson.loads(body)) == 40_000
    assert exit_code == 0
    assert messages.index("redis pool closed") < messages.index("kvstore stopped")
    assert stopped["exit_code"] == 0
    assert not process_exists(redis_pid)
    assert held_again.json() == {"held": "paused"}
    assert count.json() == {"deleted": 40_000}


def read_slowly(port: int, target: str) -> tuple[int, bytes, float]:
    """GET ``target`` through a small receive window, reading at a crawl.

    Returns the status, the decoded body and when the body was complete,
    so a test can hold a streamed response open for a few seconds.
    """
    connection = h11.Connection(h11.CLIENT)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        client.settimeout(30)
        client.connect(("127.0.0.1", port))
        request = h11.Request(
            method="GET", target=target, headers=[("Host", "kvstore")]
        )
        client.sendall(connection.send(request) + connection.send(h11.EndOfMessage()))
        status = 0
        chunks: list[bytes] = []
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                time.sleep(0.006)
                connection.receive_data(client.recv(16 * 1024))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks), time.monotonic()
            else:
                raise AssertionError(f"unexpected {event!r}")


def wait_until_refused(port: int, timeout: float = 5.0) -> float:
    """Return when new connections to ``port`` are refused or reset."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except (ConnectionRefusedError, ConnectionResetError):
            # Reset: the listening socket closed with this connection still
            # waiting in its queue.
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts connections after {timeout} s")


def process_exists(pid: int) -> bool:
    """True while a process with ``pid`` exists (and is not a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
