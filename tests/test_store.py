"""The store alone: on fakeredis and on a real server, without HTTP."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from kvstore.embedded import free_port
from kvstore.settings import Settings
from kvstore.store import (
    ERROR_KINDS,
    RedisStore,
    SeenKeys,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    translate_error,
)


@pytest.fixture(params=["fakeredis", "redis"])
async def store(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[RedisStore]:
    """The same store on fakeredis and on the real test server."""
    if request.param == "fakeredis":
        client: Redis = fakeredis.FakeAsyncRedis()
        instance = RedisStore(client, settings)
    else:
        assert settings.redis_url is not None
        instance = RedisStore.from_settings(settings, settings.redis_url)
    yield instance
    await instance.delete_matching(None)
    await instance.aclose()


async def collect(store: RedisStore, glob: str | None) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    async for batch in store.scan(glob):
        for key, value in batch:
            assert key not in found
            found[key] = value
    return found


async def test_put_reports_creation_then_replacement(store: RedisStore) -> None:
    created = await store.put("k", b"1", None)
    replaced = await store.put("k", b"2", None)

    entry = await store.get("k")

    assert (created, replaced) == (True, False)
    assert entry is not None
    assert entry.value == b"2"
    assert entry.ttl_ms is None


async def test_get_and_head_report_lifetime_and_size(store: RedisStore) -> None:
    await store.put("k", b'"hello"', 100)

    entry = await store.get("k")
    meta = await store.head("k")

    assert entry is not None
    assert meta is not None
    assert entry.ttl_ms is not None
    assert 99_000 < entry.ttl_ms <= 100_000
    assert meta.size == 7
    assert meta.ttl_ms is not None


async def test_missing_keys_are_none(store: RedisStore) -> None:
    assert await store.get("nope") is None
    assert await store.head("nope") is None
    assert await store.delete("nope") is False


async def test_put_many_then_scan_with_glob(store: RedisStore) -> None:
    await store.put_many({"a1": b"1", "a2": b"2", "b1": b"3"}, None)

    every = await collect(store, None)
    some = await collect(store, "a*")

    assert every == {"a1": b"1", "a2": b"2", "b1": b"3"}
    assert some == {"a1": b"1", "a2": b"2"}


async def test_scan_of_many_keys_yields_each_once(
    store: RedisStore, settings: Settings
) -> None:
    pairs = {f"key{index}": str(index).encode() for index in range(3 * 1000 + 7)}
    await store.put_many(pairs, None)

    found = await collect(store, None)

    assert found == pairs


async def test_delete_matching_counts_removed_keys(store: RedisStore) -> None:
    await store.put_many({f"x{index}": b"1" for index in range(2100)}, None)
    await store.put("keep", b"1", None)

    removed = await store.delete_matching("x*")

    assert removed == 2100
    assert await collect(store, None) == {"keep": b"1"}


async def test_ping_and_pool_stats(store: RedisStore) -> None:
    await store.ping()

    stats = store.pool_stats()

    assert stats.in_use == 0
    assert stats.idle >= 1
    assert stats.limit >= stats.idle


async def test_unreachable_server_raises_unavailable(settings: Settings) -> None:
    dead = RedisStore.from_settings(
        Settings(redis_connect_timeout=0.2, redis_timeout=1.0),
        f"redis://127.0.0.1:{free_port()}/0",
    )

    with pytest.raises(StoreUnavailableError):
        await dead.get("k")
    await dead.aclose()


async def test_deadline_raises_timeout_and_frees_the_connection(
    settings: Settings,
) -> None:
    assert settings.redis_url is not None
    slow = RedisStore.from_settings(
        Settings(redis_timeout=0.2, key_prefix=settings.key_prefix),
        settings.redis_url,
    )
    admin = Redis.from_url(settings.redis_url)
    await admin.client_pause(600)
    try:
        with pytest.raises(StoreTimeoutError):
            await slow.get("k")
    finally:
        await admin.client_unpause()
        await admin.aclose()
    await asyncio.sleep(0)

    assert slow.pool_stats().in_use == 0
    assert await slow.get("k") is None
    await slow.aclose()


async def test_calls_waiting_for_a_connection_are_served_in_arrival_order(
    settings: Settings,
) -> None:
    assert settings.redis_url is not None
    store = RedisStore.from_settings(
        dataclasses.replace(settings, redis_max_connections=1), settings.redis_url
    )
    finished: list[str] = []
    late: list[asyncio.Task[None]] = []

    async def read(name: str) -> None:
        await store.get(name)
        finished.append(name)

    first = asyncio.create_task(read("first"))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(read(f"waiting-{n}")) for n in range(3)]
    # Arrives just as the only connection is handed back, before any
    # waiting call has run again: it must queue behind them.
    first.add_done_callback(lambda _: late.append(asyncio.create_task(read("late"))))
    await asyncio.gather(first, *waiting)
    await late[0]
    await store.aclose()

    assert finished == ["first", "waiting-0", "waiting-1", "waiting-2", "late"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis_errors.ConnectionError("refused"), StoreUnavailableError),
        (redis_errors.AuthenticationError("bad"), StoreUnavailableError),
        (redis_errors.BusyLoadingError("loading"), StoreUnavailableError),
        (redis_errors.TimeoutError("slow"), StoreTimeoutError),
        (TimeoutError(), StoreTimeoutError),
        (redis_errors.ReadOnlyError("READONLY replica"), StoreUnavailableError),
        # redis-py strips the reply code from the classes it has for them.
        (redis_errors.ReadOnlyError("You can't write"), StoreUnavailableError),
        (redis_errors.OutOfMemoryError("used memory"), StoreUnavailableError),
        (redis_errors.MasterDownError("Link is down"), StoreUnavailableError),
        (redis_errors.TryAgainError("Multiple keys"), StoreUnavailableError),
        (redis_errors.ResponseError("OOM command not allowed"), StoreUnavailableError),
        (redis_errors.ResponseError("LOADING dataset"), StoreUnavailableError),
        (redis_errors.ResponseError("MASTERDOWN link"), StoreUnavailableError),
        (redis_errors.ResponseError("WRONGTYPE Operation"), StoreError),
        (redis_errors.DataError("bad"), StoreError),
        (redis_errors.RedisError("other"), StoreError),
    ],
)
def test_every_redis_error_kind_maps_to_a_store_error(
    error: Exception, expected: type[StoreError]
) -> None:
    translated = translate_error(error)

    assert type(translated) is expected


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis_errors.TimeoutError("slow"), "timeout"),
        (TimeoutError(), "timeout"),
        (redis_errors.ConnectionError("refused"), "connection"),
        (redis_errors.AuthenticationError("invalid password"), "auth"),
        (redis_errors.NoPermissionError("no permissions"), "auth"),
        (redis_errors.BusyLoadingError("loading"), "loading"),
        (redis_errors.ReadOnlyError("read only replica"), "readonly"),
        (redis_errors.OutOfMemoryError("command not allowed"), "oom"),
        (redis_errors.TryAgainError("multiple keys"), "tryagain"),
        (redis_errors.ResponseError("BUSY Redis is busy"), "busy"),
        (redis_errors.ResponseError("MASTERDOWN link"), "masterdown"),
        (redis_errors.ResponseError("WRONGTYPE Operation"), "response"),
        (redis_errors.DataError("bad"), "other"),
        (redis_errors.RedisError("other"), "other"),
    ],
)
def test_every_store_error_names_its_kind(error: Exception, kind: str) -> None:
    translated = translate_error(error)

    assert translated is not None
    assert translated.kind == kind
    assert kind in ERROR_KINDS


def test_non_redis_errors_are_not_translated() -> None:
    assert translate_error(ValueError("x")) is None


def test_seen_keys_returns_only_new_keys_in_order() -> None:
    seen = SeenKeys()

    first = seen.new([b"a", b"b", b"a"])
    second = seen.new([b"b", b"c"])

    assert first == [b"a", b"b"]
    assert second == [b"c"]


def test_seen_keys_stays_exact_past_the_set_limit() -> None:
    seen = SeenKeys(exact_limit=100)
    keys = [f"k{index}".encode() for index in range(5000)]

    fresh = [
        key
        for start in range(0, 5000, 250)
        for key in seen.new(keys[start : start + 250])
    ]
    repeated = seen.new(keys[::7])

    assert fresh == keys
    assert repeated == []
    assert seen.new([b"new"]) == [b"new"]
