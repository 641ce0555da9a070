"""A Redis Cluster under change: slots moving, primaries failing over.

These tests use the session's local cluster (three primaries, one replica
each) directly, change its layout while requests run, and leave it serving.
Every response must be right or a 503: never a 500, never a stale or foreign
value.
"""

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
import redis
from quart import Quart
from redis.crc import key_slot

from kvstore.app import create_app
from kvstore.embedded import EmbeddedCluster, EmbeddedRedis
from kvstore.settings import Settings
from tests.topologies import Traffic, cluster_topology, remove_prefix, run_during

JSON_HEADERS = {"Content-Type": "application/json"}

# The store's deadline in these tests: short, so that churn shows as 503s.
DEADLINE = 1.5


@pytest.fixture
def cluster_prefix(redis_cluster: EmbeddedCluster) -> Iterator[str]:
    """A fresh key prefix on the cluster, removed afterwards."""
    prefix = f"kvcluster:{uuid.uuid4().hex[:12]}:"
    yield prefix
    redis_cluster.wait_until_serving()
    client = cluster_topology(redis_cluster).client()
    try:
        remove_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
def cluster_settings(redis_cluster: EmbeddedCluster, cluster_prefix: str) -> Settings:
    """Settings on the cluster, with a deadline short enough for churn tests."""
    return cluster_topology(redis_cluster).settings(
        key_prefix=cluster_prefix, redis_timeout=DEADLINE, log_format="text"
    )


@pytest.fixture
async def cluster_app(cluster_settings: Settings) -> AsyncIterator[Quart]:
    """The app, serving from the cluster."""
    application = create_app(cluster_settings)
    async with application.test_app():
        yield application


def node_client(node: EmbeddedRedis) -> redis.Redis:
    """A plain client of one node, for admin commands and looking at its keys."""
    return redis.Redis(unix_socket_path=str(node.socket_path))


def service_keys(node: EmbeddedRedis, prefix: str) -> list[bytes]:
    """The service's keys on one node, without the store's staging records."""
    with node_client(node) as client:
        keys = client.scan_iter(match=f"{prefix}*", count=1000)
        return [key for key in keys if b"\x00" not in key]


def primaries(cluster: EmbeddedCluster) -> list[EmbeddedRedis]:
    """The nodes that are primaries now."""
    found = []
    for node in cluster.nodes:
        with node_client(node) as client:
            if client.info("replication")["role"] == "master":
                found.append(node)
    return found


def owner(cluster: EmbeddedCluster, slot: int) -> EmbeddedRedis:
    """The primary that serves ``slot`` now, as the first primary sees it."""
    with node_client(primaries(cluster)[0]) as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in cluster.nodes if node.port == primary[1])
    raise AssertionError(f"no primary serves slot {slot}")


async def test_bulk_put_spreads_keys_over_every_primary(
    redis_cluster: EmbeddedCluster, cluster_app: Quart, cluster_prefix: str
) -> None:
    pairs = {f"spread-{index}": index for index in range(300)}
    client = cluster_app.test_client()

    response = await client.put("/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS)
    read = await client.get("/keys")

    assert response.status_code == 200
    assert await read.get_json() == pairs
    for node in primaries(redis_cluster):
        assert 50 < len(service_keys(node, cluster_prefix)) < 150


async def test_bulk_put_stores_nothing_when_one_shard_refuses(
    redis_cluster: EmbeddedCluster, cluster_app: Quart, cluster_prefix: str
) -> None:
    pairs = {f"all-or-none-{index}": index for index in range(200)}
    refusing = primaries(redis_cluster)[1]
    client = cluster_app.test_client()

    with node_client(refusing) as direct:
        direct.config_set("maxmemory", "1")
        try:
            response = await client.put(
                "/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS
            )
        finally:
            direct.config_set("maxmemory", "0")
    read = await client.get("/keys")
    stored = []
    for node in primaries(redis_cluster):
        with node_client(node) as direct:
            stored += list(direct.scan_iter(match=f"{cluster_prefix}*", count=1000))

    assert response.status_code == 503
    assert await read.get_json() == {}
    assert stored == []


async def test_delete_all_removes_keys_on_every_primary(
    redis_cluster: EmbeddedCluster, cluster_app: Quart, cluster_prefix: str
) -> None:
    pairs = {f"gone-{index}": index for index in range(120)}
    client = cluster_app.test_client()
    await client.put("/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS)

    response = await client.delete("/keys")

    assert await response.get_json() == {"deleted": 120}
    for node in primaries(redis_cluster):
        assert service_keys(node, cluster_prefix) == []


def migrate_slot(cluster: EmbeddedCluster, slot: int, pause: float) -> None:
    """Move ``slot`` to another primary key by key, as resharding tools do."""
    source = owner(cluster, slot)
    target = next(node for node in primaries(cluster) if node is not source)
    with node_client(source) as src, node_client(target) as dst:
        source_id = src.execute_command("CLUSTER", "MYID").decode()
        target_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 2):
            # Without REPLACE: a key written on both sides (a client writing
            # to the target before the source let go of it) fails the move.
            src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
            )
            time.sleep(pause)
        # The target first, so the slot is never claimed by nobody.
        for node in [target, source, *primaries(cluster)]:
            with node_client(node) as each:
                each.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_requests_during_slot_migration_succeed_or_get_503(
    redis_cluster: EmbeddedCluster, cluster_app: Quart
) -> None:
    # One hash tag puts every key in the slot being moved.
    keys = [f"{{moving}}-{index}" for index in range(24)]
    traffic = Traffic(cluster_app.test_client(), keys)
    slot = key_slot(b"moving")
    before = owner(redis_cluster, slot)
    change = threading.Thread(target=migrate_slot, args=(redis_cluster, slot, 0.05))

    await run_during(traffic, change)

    assert owner(redis_cluster, slot) is not before
    assert traffic.problems == []
    assert traffic.statuses.get(200, 0) > 20
    assert traffic.slowest < DEADLINE + 2.0
    await traffic.read_all()
    assert traffic.problems == []


def replica_of(cluster: EmbeddedCluster, primary: EmbeddedRedis) -> EmbeddedRedis:
    """The node replicating ``primary`` now."""
    for node in cluster.nodes:
        with node_client(node) as client:
            info = client.info("replication")
        if info["role"] == "slave" and info["master_port"] == primary.port:
            return node
    raise AssertionError(f"no replica follows port {primary.port}")


def wait_for_role(node: EmbeddedRedis, role: str, timeout: float = 20.0) -> None:
    """Return once ``node`` reports ``role`` (``master`` or ``slave``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with node_client(node) as client:
                if client.info("replication")["role"] == role:
                    return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"port {node.port} did not become {role}")


async def test_manual_failover_loses_nothing_and_needs_no_restart(
    redis_cluster: EmbeddedCluster, cluster_app: Quart
) -> None:
    keys = [f"handover-{index}" for index in range(24)]
    traffic = Traffic(cluster_app.test_client(), keys)
    primary = owner(redis_cluster, key_slot(f"{keys[0]}".encode()))
    replica = replica_of(redis_cluster, primary)

    def hand_over() -> None:
        with node_client(replica) as client:
            client.execute_command("CLUSTER", "FAILOVER")
        wait_for_role(replica, "master")

    await run_during(traffic, threading.Thread(target=hand_over))
    redis_cluster.wait_until_serving()
    await traffic.read_all()
    for key in keys:
        await traffic.read(key)

    assert replica in primaries(redis_cluster)
    assert traffic.problems == []
    assert traffic.statuses.get(200, 0) > 20
    assert traffic.slowest < DEADLINE + 2.0


async def test_killed_primary_gives_503s_then_its_replica_serves(
    redis_cluster: EmbeddedCluster, cluster_app: Quart
) -> None:
    keys = [f"crash-{index}" for index in range(24)]
    traffic = Traffic(cluster_app.test_client(), keys)
    victim = primaries(redis_cluster)[0]
    successor = replica_of(redis_cluster, victim)

    def crash() -> None:
        victim.kill()
        wait_for_role(successor, "master")

    await run_during(traffic, threading.Thread(target=crash))
    after_failover = Traffic(
        cluster_app.test_client(), [f"after-{n}" for n in range(8)]
    )
    for key in after_failover.keys:
        await after_failover.write(key)
        await after_failover.read(key)
    # The old primary comes back as a replica of its successor.
    await asyncio.to_thread(victim.start)
    redis_cluster.wait_until_serving()

    # Writes acknowledged just before the crash may be lost: replication is
    # asynchronous. Everything else must hold.
    statuses = [problem for problem in traffic.problems if problem.startswith("status")]
    assert statuses == []
    assert traffic.statuses.get(503, 0) > 0
    assert traffic.slowest < DEADLINE + 2.0
    assert after_failover.problems == []
    assert after_failover.statuses == {201: 8, 200: 8}


async def test_bulk_put_commit_is_retried_until_a_shard_takes_it(
    redis_cluster: EmbeddedCluster,
    cluster_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pairs = {f"retried-{index}": index for index in range(200)}
    # Time enough for the shard to come back, even on a loaded machine.
    app = create_app(dataclasses.replace(cluster_settings, redis_timeout=5.0))
    refusing = node_client(primaries(redis_cluster)[2])

    async with app.test_app():
        store = app.extensions["kvstore.holder"].store.inner
        stage = store._stage

        async def stage_then_refuse_for_a_while(*args: object) -> None:
            await stage(*args)
            refusing.config_set("maxmemory", "1")
            asyncio.get_running_loop().call_later(
                0.3, refusing.config_set, "maxmemory", "0"
            )

        monkeypatch.setattr(store, "_stage", stage_then_refuse_for_a_while)
        client = app.test_client()
        try:
            response = await client.put(
                "/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS
            )
            read = await client.get("/keys")
        finally:
            await asyncio.sleep(0.4)
            refusing.config_set("maxmemory", "0")
            refusing.close()

    assert response.status_code == 200
    assert await read.get_json() == pairs


async def test_bulk_put_losing_a_shard_after_staging_is_503_and_logged(
    redis_cluster: EmbeddedCluster,
    cluster_app: Quart,
    cluster_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pairs = {f"partial-{index}": index for index in range(200)}
    store = cluster_app.extensions["kvstore.holder"].store.inner
    stage = store._stage
    lost = primaries(redis_cluster)[2]
    refusing = node_client(lost)

    async def stage_then_refuse(*args: object) -> None:
        await stage(*args)
        refusing.config_set("maxmemory", "1")

    monkeypatch.setattr(store, "_stage", stage_then_refuse)
    client = cluster_app.test_client()

    try:
        response = await client.put(
            "/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS
        )
    finally:
        refusing.config_set("maxmemory", "0")
        refusing.close()
    written = [
        key
        for node in primaries(redis_cluster)
        for key in service_keys(node, cluster_prefix)
    ]

    assert response.status_code == 503
    assert 0 < len(written) < len(pairs)
    assert service_keys(lost, cluster_prefix) == []
    assert any(
        record.getMessage() == "bulk write partly applied" for record in caplog.records
    )
