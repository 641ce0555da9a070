"""Shared fixtures: real Redis deployments, settings, the app and its client.

Every test that uses ``settings``, ``app``, ``client``, ``redis_client``,
``key_prefix`` or ``live`` runs once per Redis topology: a standalone server,
a three-primary Redis Cluster and a Sentinel-managed primary (test ids
``standalone``, ``cluster`` and ``sentinel``; choose with ``-k``). The suite
starts each deployment itself, once per session, on free ports in temporary
directories (the standalone server with the same code as the embedded mode of
``kvstore serve``) unless ``KVSTORE_TEST_REDIS_URL`` names a standalone
server; without a ``redis-server`` binary the cluster and sentinel runs skip.
Tests never flush a database: each test gets its own key prefix and its keys
are removed afterwards, on every primary.
"""

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.embedded import (
    EmbeddedCluster,
    EmbeddedRedis,
    EmbeddedSentinelGroup,
    find_redis_server,
    free_port,
)
from kvstore.settings import Settings
from kvstore.store import StoreUnavailableError

TOPOLOGIES = ("standalone", "cluster", "sentinel")

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclasses.dataclass(frozen=True)
class RedisTopology:
    """One Redis deployment under test, and how the service is pointed at it.

    ``environ`` holds the ``KVSTORE_*`` variables that select it; ``client``
    opens a synchronous client that follows it (the cluster client offers the
    commands tests use of ``redis.Redis``).
    """

    name: str
    environ: dict[str, str]
    client: Callable[[], redis.Redis]

    def settings(self, **fields: Any) -> Settings:
        """Settings on this deployment, with ``fields`` on top."""
        return dataclasses.replace(Settings.from_env(self.environ), **fields)


def _need_redis_server() -> None:
    if find_redis_server() is None:
        pytest.skip("no redis-server binary: install Redis to test this topology")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the standalone Redis server the tests use."""
    url = os.environ.get("KVSTORE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("redis"), persist=False, supervise=False
    )
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedCluster]:
    """A local Redis Cluster: three primaries with one replica each."""
    _need_redis_server()
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("cluster"), replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinels(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedSentinelGroup]:
    """A primary, one replica and three sentinels watching them."""
    _need_redis_server()
    group = EmbeddedSentinelGroup(tmp_path_factory.mktemp("sentinel"))
    group.start()
    yield group
    group.stop()


def cluster_topology(cluster: EmbeddedCluster) -> RedisTopology:
    """The topology of a running ``EmbeddedCluster``."""

    def connect() -> redis.Redis:
        return cast(redis.Redis, redis.RedisCluster.from_url(cluster.url))

    return RedisTopology("cluster", {"KVSTORE_REDIS_URL": cluster.url}, connect)


def sentinel_topology(group: EmbeddedSentinelGroup) -> RedisTopology:
    """The topology of a running ``EmbeddedSentinelGroup``."""
    addresses = ",".join(f"{host}:{port}" for host, port in group.sentinel_addresses)

    def connect() -> redis.Redis:
        host, _, port = group.primary_address().rpartition(":")
        return redis.Redis(host=host, port=int(port))

    environ = {
        "KVSTORE_REDIS_SENTINELS": addresses,
        "KVSTORE_REDIS_SENTINEL_SERVICE": group.service,
    }
    return RedisTopology("sentinel", environ, connect)


@pytest.fixture(scope="session", params=TOPOLOGIES)
def redis_topology(request: pytest.FixtureRequest) -> RedisTopology:
    """Each Redis deployment in turn; tests that use it run once per topology."""
    name: str = request.param
    if name == "cluster":
        return cluster_topology(request.getfixturevalue("redis_cluster"))
    if name == "sentinel":
        return sentinel_topology(request.getfixturevalue("redis_sentinels"))
    url: str = request.getfixturevalue("redis_url")
    return RedisTopology(
        "standalone", {"KVSTORE_REDIS_URL": url}, lambda: redis.Redis.from_url(url)
    )


@pytest.fixture
def redis_client(redis_topology: RedisTopology) -> Iterator[redis.Redis]:
    """A synchronous client of the topology under test, to look behind the API."""
    client = redis_topology.client()
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A prefix no other test uses; its keys are removed after the test."""
    prefix = f"kvtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    remove_prefix(redis_client, prefix)


def remove_prefix(client: redis.Redis, prefix: str) -> None:
    """Unlink every key under ``prefix``, on every primary of a cluster."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


@pytest.fixture
def settings(
    redis_topology: RedisTopology, key_prefix: str, tmp_path: Path
) -> Settings:
    """Settings for one test, on the topology under test and the test's prefix."""
    return redis_topology.settings(
        key_prefix=key_prefix, data_dir=tmp_path, log_format="json"
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Quart]:
    """The app, serving: its Redis pool is open for the test's duration."""
    application = create_app(settings)
    async with application.test_app():
        yield application


@pytest.fixture
def client(app: Quart) -> QuartClient:
    """A test client of the serving app."""
    return app.test_client()


@pytest.fixture(scope="session")
def live_url(
    redis_topology: RedisTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real ``kvstore serve`` process (Hypercorn) on a free port.

    For what only a real server shows: percent-decoding of raw paths, HEAD
    lengths, streaming. Its keys live under a prefix of their own.
    """
    log_path = tmp_path_factory.mktemp("live") / "kvstore.log"
    with serve_process(redis_topology, LIVE_PREFIX, log_path) as url:
        yield url
    client = redis_topology.client()
    try:
        remove_prefix(client, LIVE_PREFIX)
    finally:
        client.close()


@contextlib.contextmanager
def serve_process(
    topology: RedisTopology, prefix: str, log_path: Path
) -> Iterator[str]:
    """Run ``kvstore serve`` on ``topology`` at a free port; yield its URL."""
    port = free_port()
    environ = {
        **os.environ,
        **topology.environ,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_KEY_PREFIX": prefix,
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve"],
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=15)


LIVE_PREFIX = f"kvlive:{uuid.uuid4().hex[:12]}:"


def wait_until_healthy(
    url: str, process: "subprocess.Popen[bytes]", timeout: float = 20.0
) -> None:
    """Return once ``url`` answers ``/healthz``; fail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"kvstore exited with {process.returncode} before serving")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"kvstore did not answer on {url} within {timeout} s")


@pytest.fixture
async def live(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the live server."""
    async with httpx.AsyncClient(base_url=live_url, timeout=30.0) as http:
        yield http


@dataclasses.dataclass
class Traffic:
    """Writers and readers of versioned values, checking every answer.

    Each key has one writer, which stores increasing versions; ``acked``
    holds the last version a 2xx answered. A read must give a version no
    older than the one acknowledged before it started and no newer than the
    last one tried. ``problems`` lists every answer that broke the rules.
    """

    client: QuartClient
    keys: list[str]
    acked: dict[str, int] = dataclasses.field(default_factory=dict)
    tried: dict[str, int] = dataclasses.field(default_factory=dict)
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    slowest: float = 0.0

    def count(self, status: int, started: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.slowest = max(self.slowest, time.monotonic() - started)
        if status not in (200, 201, 204, 404, 503):
            self.problems.append(f"status {status}")

    async def write(self, key: str) -> None:
        version = self.tried.get(key, 0) + 1
        self.tried[key] = version
        started = time.monotonic()
        response = await self.client.put(
            f"/keys/{key}", data=str(version).encode(), headers=JSON_HEADERS
        )
        self.count(response.status_code, started)
        if response.status_code in (200, 201):
            self.acked[key] = version

    async def read(self, key: str) -> None:
        floor = self.acked.get(key, 0)
        started = time.monotonic()
        response = await self.client.get(f"/keys/{key}")
        self.count(response.status_code, started)
        if response.status_code == 200:
            self.check(key, (await response.get_json())[key], floor)
        elif response.status_code == 404 and floor:
            self.problems.append(f"{key}: 404 after version {floor} was stored")

    async def read_all(self) -> None:
        floors = dict(self.acked)
        started = time.monotonic()
        try:
            response = await self.client.get("/keys")
        except StoreUnavailableError:
            # A failure after the first batch ends the streamed body early,
            # which a client sees as a broken document, never a wrong one.
            self.count(503, started)
            return
        self.count(response.status_code, started)
        if response.status_code != 200:
            return
        pairs = orjson.loads(await response.get_data())
        for key, floor in floors.items():
            if key not in pairs:
                self.problems.append(f"full read lost {key} (version {floor})")
            else:
                self.check(key, pairs[key], floor)

    def check(self, key: str, version: int, floor: int) -> None:
        if not floor <= version <= self.tried[key]:
            self.problems.append(
                f"{key}: read version {version}, stored {floor}, "
                f"last tried {self.tried[key]}"
            )

    async def run(self, stop: asyncio.Event, full_reads: bool = True) -> None:
        """Write and read every key in turn until ``stop`` is set."""

        async def worker(keys: list[str]) -> None:
            while not stop.is_set():
                for key in keys:
                    await self.write(key)
                    await self.read(key)

        async def scanner() -> None:
            while not stop.is_set():
                await self.read_all()
                await asyncio.sleep(0.05)

        shares = [self.keys[index::4] for index in range(4)]
        tasks = [worker(share) for share in shares]
        if full_reads:
            tasks.append(scanner())
        await asyncio.gather(*tasks)


async def run_during(traffic: Traffic, change: threading.Thread) -> None:
    """Run ``traffic`` before, during and shortly after ``change``."""
    stop = asyncio.Event()
    running = asyncio.create_task(traffic.run(stop))
    await asyncio.sleep(0.3)
    change.start()
    await asyncio.to_thread(change.join)
    await asyncio.sleep(1.0)
    stop.set()
    await running
