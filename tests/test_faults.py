"""Faults of the data tier, against real redis-server processes.

Each test starts its own Redis on a free port and, where it needs one, its
own ``kvstore serve``; then it kills, pauses, freezes or restarts that
Redis while requests are running and checks what clients saw.
"""

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from quart import Quart
from services import Traffic, report, running, start_redis

from kvstore.app import create_app
from kvstore.embedded import EmbeddedRedis
from kvstore.settings import Settings
from kvstore.store import RedisStore, StoreTimeoutError

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


@pytest.mark.parametrize("stall", ["client-pause", "sigstop"])
async def test_stalled_redis_gives_503_within_deadline_and_frees_the_pool(
    tmp_path: Path, stall: str
) -> None:
    redis_server = start_redis(tmp_path / "redis")
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
            assert isinstance(store, RedisStore)
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
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    process = server.process
    return lambda: process.send_signal(signal.SIGCONT)


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

    def __init__(self, store: RedisStore) -> None:
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
    assert {kind for kind, _ in outcomes} == {"timeout"}
    assert max(elapsed for _, elapsed in outcomes) <= 0.3 + MARGIN / 2
