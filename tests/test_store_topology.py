"""Choosing the store by topology, and settings and errors that belong to it."""

import asyncio
import secrets

import pytest
import redis
from quart import Quart
from redis import exceptions as redis_errors
from redis.crc import key_slot

from kvstore.app import create_app
from kvstore.embedded import EmbeddedCluster, EmbeddedRedis, free_port
from kvstore.settings import Settings, SettingsError
from kvstore.store import (
    ClusterStore,
    PendingStore,
    RedisStore,
    SentinelStore,
    StoreError,
    StoreUnavailableError,
    open_store,
    slot_tags,
    translate_error,
)
from tests.topologies import RedisTopology, cluster_topology

EXPECTED_STORE = {
    "standalone": RedisStore,
    "cluster": ClusterStore,
    "sentinel": SentinelStore,
}


async def test_serving_opens_the_store_of_the_topology(
    app: Quart, redis_topology: RedisTopology
) -> None:
    store = app.extensions["kvstore.holder"].store.inner

    await store.ping()

    assert type(store) is EXPECTED_STORE[redis_topology.name]


def test_sentinel_addresses_are_parsed_in_order() -> None:
    settings = Settings.from_env(
        {
            "KVSTORE_REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380,[::1]:5000",
            "KVSTORE_REDIS_SENTINEL_SERVICE": "main",
        }
    )

    addresses = settings.sentinel_addresses()

    assert addresses == [("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 5000)]


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"KVSTORE_REDIS_SENTINELS": "a:1"}, "KVSTORE_REDIS_SENTINELS"),
        ({"KVSTORE_REDIS_SENTINEL_SERVICE": "main"}, "KVSTORE_REDIS_SENTINELS"),
        (
            {"KVSTORE_REDIS_SENTINELS": "a", "KVSTORE_REDIS_SENTINEL_SERVICE": "m"},
            "KVSTORE_REDIS_SENTINELS",
        ),
        (
            {"KVSTORE_REDIS_SENTINELS": "a:0", "KVSTORE_REDIS_SENTINEL_SERVICE": "m"},
            "KVSTORE_REDIS_SENTINELS",
        ),
        ({"KVSTORE_REDIS_WAIT_REPLICAS": "-1"}, "KVSTORE_REDIS_WAIT_REPLICAS"),
    ],
)
def test_bad_topology_settings_name_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"), 503),
        (redis_errors.ClusterError("TTL exhausted."), 503),
        (redis_errors.SlotNotCoveredError("slot 7 is not covered"), 503),
        (redis_errors.TryAgainError("TRYAGAIN"), 503),
        (redis_errors.MovedError("3999 127.0.0.1:6381"), 503),
        (redis_errors.AskError("3999 127.0.0.1:6381"), 503),
        (redis_errors.MasterDownError("MASTERDOWN link is down"), 503),
        (redis_errors.OutOfMemoryError("command not allowed when used memory"), 503),
        (redis_errors.ReadOnlyError("You can't write against a replica."), 503),
        (redis_errors.RedisClusterException("No targets were found"), 500),
    ],
)
def test_cluster_and_failover_errors_map_to_a_status(
    error: Exception, expected: int
) -> None:
    translated = translate_error(error)

    assert isinstance(translated, StoreError)
    status = 503 if isinstance(translated, StoreUnavailableError) else 500
    assert status == expected


def test_slot_tags_land_in_their_slots() -> None:
    tags = slot_tags()

    assert len(tags) == 16384
    assert all(key_slot(b"{" + tag + b"}x") == slot for slot, tag in enumerate(tags))


async def test_wait_replicas_is_refused_on_a_cluster(
    redis_cluster: EmbeddedCluster,
) -> None:
    settings = cluster_topology(redis_cluster).settings(redis_wait_replicas=1)

    app = create_app(settings)

    with pytest.raises(Exception, match="KVSTORE_REDIS_WAIT_REPLICAS"):
        async with app.test_app():
            pass


@pytest.mark.parametrize("prefix", ["kv{", "kv{}:", "a}{b"])
async def test_prefix_with_a_broken_hash_tag_is_refused_on_a_cluster(
    redis_cluster: EmbeddedCluster, prefix: str
) -> None:
    app = create_app(cluster_topology(redis_cluster).settings(key_prefix=prefix))

    with pytest.raises(Exception, match="KVSTORE_KEY_PREFIX"):
        async with app.test_app():
            pass


async def test_service_starts_while_redis_is_down_and_finds_it_later(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_timeout=0.5,
        redis_connect_timeout=0.2,
        redis_retries=0,
    )
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("late"), port=port, persist=False, supervise=False
    )
    app = create_app(settings)

    async with app.test_app():
        client = app.test_client()
        before = await client.get("/readyz")
        store = app.extensions["kvstore.holder"].store.inner
        await asyncio.to_thread(server.start)
        try:
            after = await client.get("/readyz")
            stored = await client.put(
                "/keys/late", data=b"1", headers={"Content-Type": "application/json"}
            )
            read = await client.get("/keys/late")
        finally:
            server.stop()

    assert isinstance(store, PendingStore)
    assert before.status_code == 503
    assert before.headers["Retry-After"] == "1"
    assert after.status_code == 200
    assert stored.status_code == 201
    assert await read.get_json() == {"late": 1}


async def test_a_server_that_refuses_info_is_served_as_a_single_one(
    redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    user = f"noinfo-{key_prefix.split(':')[1]}"
    password = secrets.token_hex(16)
    redis_client.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=[f"{key_prefix}*"],
        commands=["+@all", "-info"],
    )
    settings = Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        redis_username=user,
        redis_password=password,
    )
    try:
        store = await open_store(settings)
        try:
            created = await store.put("k", b"1", None)
            entry = await store.get("k")
        finally:
            await store.aclose()
    finally:
        redis_client.acl_deluser(user)

    assert type(store) is RedisStore
    assert created
    assert entry is not None
    assert entry.value == b"1"
