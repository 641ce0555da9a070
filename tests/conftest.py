"""Shared fixtures: a real Redis server, settings, the app and its client.

The suite starts its own Redis server (with the same code as the embedded
mode of ``kvstore serve``) unless ``KVSTORE_TEST_REDIS_URL`` names one. Tests
never flush a database: each test gets its own key prefix and its keys are
removed afterwards.
"""

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.embedded import EmbeddedRedis, free_port
from kvstore.settings import Settings
from tests.helpers import wait_until_healthy

LIVE_PREFIX = f"kvlive:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the Redis server the tests use."""
    url = os.environ.get("KVSTORE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("redis"), persist=False, supervise=False
    )
    yield server.start()
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client on the test server, to look behind the API."""
    client: redis.Redis = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A prefix no other test uses; its keys are removed after the test."""
    prefix = f"kvtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        redis_client.unlink(*keys[start : start + 1000])


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    """Settings for one test, on the test Redis and the test's own prefix."""
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        data_dir=tmp_path,
        log_format="json",
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
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real ``kvstore serve`` process on a free port, on each server.

    For what only a real server shows: percent-decoding of raw paths, HEAD
    lengths, streaming. Its keys live under a prefix of their own.
    """
    port = free_port()
    log_path = tmp_path_factory.mktemp("live") / "kvstore.log"
    environ = {
        **os.environ,
        "KVSTORE_REDIS_URL": redis_url,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_KEY_PREFIX": LIVE_PREFIX,
        "KVSTORE_SERVER": request.param,
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
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{LIVE_PREFIX}*"))
        if keys:
            client.unlink(*keys)


@pytest.fixture
async def live(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the live server."""
    async with httpx.AsyncClient(base_url=live_url, timeout=30.0) as http:
        yield http
