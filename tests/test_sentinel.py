"""A Sentinel-managed primary failing over while the service runs.

These tests use the session's sentinel group (a primary, one replica, three
sentinels) directly and leave it settled, whichever server is primary then.
"""

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.embedded import EmbeddedSentinelGroup
from kvstore.settings import Settings
from tests.topologies import (
    JSON_HEADERS,
    Traffic,
    remove_prefix,
    run_during,
    sentinel_topology,
)


@pytest.fixture
def sentinel_prefix(redis_sentinels: EmbeddedSentinelGroup) -> Iterator[str]:
    """A fresh key prefix, removed afterwards from whichever server is primary."""
    prefix = f"kvsentinel:{uuid.uuid4().hex[:12]}:"
    yield prefix
    redis_sentinels.wait_until_settled()
    client = sentinel_topology(redis_sentinels).client()
    try:
        remove_prefix(client, prefix)
    finally:
        client.close()


def sentinel_settings(
    group: EmbeddedSentinelGroup, prefix: str, **fields: float
) -> Settings:
    """Settings on the sentinel group, with a short deadline for failover tests."""
    chosen: dict[str, float] = {"redis_timeout": 1.0, **fields}
    return sentinel_topology(group).settings(
        key_prefix=prefix, log_format="text", **chosen
    )


@pytest.fixture
async def waiting_app(
    redis_sentinels: EmbeddedSentinelGroup, sentinel_prefix: str
) -> AsyncIterator[Quart]:
    """The app on the sentinel group, each write confirmed by the replica."""
    settings = sentinel_settings(
        redis_sentinels, sentinel_prefix, redis_wait_replicas=1
    )
    application = create_app(settings)
    async with application.test_app():
        yield application


async def test_failover_keeps_confirmed_writes_and_answers_503_meanwhile(
    redis_sentinels: EmbeddedSentinelGroup, waiting_app: Quart
) -> None:
    client = waiting_app.test_client()
    before = {f"before-{index}": index for index in range(40)}
    stored = [
        await client.put(f"/keys/{key}", data=str(value).encode(), headers=JSON_HEADERS)
        for key, value in before.items()
    ]
    old_primary = redis_sentinels.server_at(redis_sentinels.primary_address())
    assert old_primary.process is not None
    pid = old_primary.process.pid
    traffic = Traffic(client, [f"during-{index}" for index in range(8)])

    def freeze_until_replaced() -> None:
        # A stopped process looks to the sentinels like a hung or cut-off
        # server: they promote the replica after down-after-milliseconds.
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while redis_sentinels.primary_address().endswith(f":{old_primary.port}"):
            assert time.monotonic() < deadline, "no failover happened"
            time.sleep(0.05)

    try:
        await run_during(traffic, threading.Thread(target=freeze_until_replaced))
        reads_after = [await client.get(f"/keys/{key}") for key in before]
    finally:
        os.kill(pid, signal.SIGCONT)
    # The old primary wakes up, is turned into a replica, and confirms writes.
    await asyncio.to_thread(redis_sentinels.wait_until_settled)
    write_after = await write_once_replicated(client, "after")

    assert [response.status_code for response in stored] == [201] * len(before)
    assert traffic.problems == []
    assert traffic.statuses.get(503, 0) > 0
    assert traffic.slowest < 1.0 + 2.0
    assert [response.status_code for response in reads_after] == [200] * len(before)
    assert [(await response.get_json()) for response in reads_after] == [
        {key: value} for key, value in before.items()
    ]
    assert write_after in (200, 201)
    assert not redis_sentinels.primary_address().endswith(f":{old_primary.port}")


async def write_once_replicated(client: QuartClient, key: str) -> int:
    """PUT ``key`` until a replica confirms it, for up to 15 s; the last status.

    A replica that has just resynchronised can take a moment to acknowledge
    its first write: until then a write waiting for it is a 503.
    """
    deadline = time.monotonic() + 15
    while True:
        response = await client.put(f"/keys/{key}", data=b"1", headers=JSON_HEADERS)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response.status_code
        await asyncio.sleep(0.2)


async def test_write_without_enough_replicas_is_503(
    redis_sentinels: EmbeddedSentinelGroup, sentinel_prefix: str
) -> None:
    settings = sentinel_settings(
        redis_sentinels, sentinel_prefix, redis_timeout=0.5, redis_wait_replicas=2
    )
    application = create_app(settings)

    async with application.test_app():
        client = application.test_client()
        response = await client.put("/keys/lonely", data=b"1", headers=JSON_HEADERS)
        bulk = await client.put("/keys", data=b'{"a": 1, "b": 2}', headers=JSON_HEADERS)
        delete = await client.delete("/keys/lonely")

    assert response.status_code == 503
    assert "reached 1 of 2 replicas" in (await response.get_json())["detail"]
    assert bulk.status_code == 503
    assert delete.status_code == 503
