"""Hostile and malformed bodies, queries and filters, through the app.

Each case gets a clear 4xx problem, or is served exactly as documented, and
leaves what Redis holds unchanged unless it was a valid write.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.settings import Settings

JSON_HEADERS = {"Content-Type": "application/json"}

Snapshot = dict[object, tuple[object, bool]]


@pytest.fixture
def unchanged(
    redis_client: redis.Redis, key_prefix: str
) -> Callable[[], tuple[Snapshot, Snapshot]]:
    """Store sentinel keys; return a function giving (before, now) snapshots."""
    redis_client.set(f"{key_prefix}keep", b'"kept"')
    redis_client.set(f"{key_prefix}brief", b"1", ex=3600)
    before = snapshot(redis_client, key_prefix)

    def compare() -> tuple[Snapshot, Snapshot]:
        return before, snapshot(redis_client, key_prefix)

    return compare


def snapshot(client: redis.Redis, prefix: str) -> Snapshot:
    """Every key under ``prefix``: its value and whether it has a lifetime."""
    return {
        key: (client.get(key), client.ttl(key) > 0)
        for key in client.scan_iter(match=f"{prefix}*", count=1000)
    }


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` levels of arrays and objects, alternating."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


def nested_text(depth: int) -> bytes:
    """``depth`` levels of arrays as JSON text, without building them."""
    return b"[" * depth + b"1" + b"]" * depth


async def problem(response: Any) -> dict[str, Any]:
    """The problem body of an error response, checked for shape."""
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.get_json()
    assert body["status"] == response.status_code
    return body


@pytest.mark.parametrize(
    "body",
    [
        nested_text(255),
        nested_text(300),
        nested_text(1024),
        nested_text(1025),
        nested_text(100_000),
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
    ],
    ids=["255-levels", "300", "1024", "1025", "100000", "objects-5000"],
)
async def test_too_deeply_nested_value_is_400_and_stores_nothing(
    client: QuartClient, unchanged: Callable[[], tuple[Snapshot, Snapshot]], body: bytes
) -> None:
    single = await client.put("/keys/deep", data=body, headers=JSON_HEADERS)
    bulk = await client.put(
        "/keys", data=b'{"ok": 1, "deep": ' + body + b"}", headers=JSON_HEADERS
    )

    detail = (await problem(single))["detail"]
    assert (single.status_code, bulk.status_code) == (400, 400)
    assert "nested too deeply" in detail or "depth limit" in detail
    await problem(bulk)
    before, now = unchanged()
    assert now == before


async def test_value_nested_254_levels_is_stored_and_read_back(
    client: QuartClient,
) -> None:
    value = nested(254)

    stored = await client.put(
        "/keys/deepest", data=orjson.dumps(value), headers=JSON_HEADERS
    )
    read = await client.get("/keys/deepest")

    assert stored.status_code == 201
    assert orjson.loads(await read.get_data()) == {"deepest": value}


@pytest.mark.parametrize(
    "number",
    [b"1e400", b"-1e400", b"1" * 400, b"-" + b"1" * 400, b"9" * 100_000, b"1e99999"],
    ids=["1e400", "-1e400", "400-digits", "-400-digits", "100k-digits", "exp"],
)
async def test_number_beyond_double_range_is_400_and_stores_nothing(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    number: bytes,
) -> None:
    single = await client.put("/keys/huge", data=number, headers=JSON_HEADERS)
    bulk = await client.put(
        "/keys", data=b'{"ok": 1, "huge": ' + number + b"}", headers=JSON_HEADERS
    )

    assert (single.status_code, bulk.status_code) == (400, 400)
    assert "JSON" in (await problem(single))["detail"]
    before, now = unchanged()
    assert now == before


@pytest.mark.parametrize(
    ("sent", "read_back"),
    [
        (b"18446744073709551615", 2**64 - 1),
        (b"-9223372036854775808", -(2**63)),
        (b"18446744073709551616", float(2**64)),
        (b"123456789012345678901234567890", 1.2345678901234568e29),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        (b"1e-400", 0.0),
        (b"0." + b"3" * 5000, 0.3333333333333333),
    ],
)
async def test_large_numbers_are_stored_as_documented(
    client: QuartClient, sent: bytes, read_back: float
) -> None:
    """Integers within 64 bits stay exact; any other number becomes a double."""
    stored = await client.put("/keys/n", data=sent, headers=JSON_HEADERS)
    read = await client.get("/keys/n")

    assert stored.status_code == 201
    value = orjson.loads(await read.get_data())["n"]
    assert value == read_back
    assert type(value) is type(read_back)


@pytest.mark.parametrize(
    "body",
    [
        b'"\xff"',
        b'"caf\xc3"',
        b'"\xed\xa0\x80"',
        b'"\xc0\xaf"',
        b'"\\ud800"',
        b'"a\x00b"',
        b"\x00",
        b"\xef\xbb\xbf1",
        b"1 2",
        b"",
    ],
    ids=[
        "ff",
        "cut-sequence",
        "surrogate",
        "overlong",
        "lone-surrogate-escape",
        "raw-nul",
        "nul-only",
        "bom",
        "two-documents",
        "empty",
    ],
)
async def test_invalid_utf8_nul_or_malformed_value_is_400(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    body: bytes,
) -> None:
    response = await client.put("/keys/bad", data=body, headers=JSON_HEADERS)

    assert response.status_code == 400
    await problem(response)
    before, now = unchanged()
    assert now == before


@pytest.mark.parametrize(
    "body",
    [
        b'{"ok": 1, "\xff": 2}',
        b'{"ok": 1, "a\\u0000b": 2}',
        b'{"ok": 1, "line\\nbreak": 2}',
        b'{"ok": 1, "": 2}',
        b'{"ok": 1, "\\ud800": 2}',
        b'{"ok": 1, "bad": "\xff"}',
        b"[1, 2]",
        b'"one large string"',
        b"null",
    ],
)
async def test_bad_pair_in_a_bulk_write_is_400_and_stores_none_of_them(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    body: bytes,
) -> None:
    response = await client.put("/keys", data=body, headers=JSON_HEADERS)

    assert response.status_code == 400
    await problem(response)
    before, now = unchanged()
    assert now == before


async def test_escaped_nul_in_a_value_is_kept_exactly(client: QuartClient) -> None:
    stored = await client.put(
        "/keys/nul", data=b'"a\\u0000b\\u001f"', headers=JSON_HEADERS
    )
    read = await client.get("/keys/nul")

    assert stored.status_code == 201
    assert await read.get_data() == b'{"nul":"a\\u0000b\\u001f"}'


@pytest.mark.parametrize(
    "query",
    ["a%00b=1", "%FF=1", "k=%FF", "k=%C0%AF", "k=1&k=2", "expire_in=%00", "a%0A=1"],
)
async def test_bad_query_form_write_is_400_and_stores_nothing(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    query: str,
) -> None:
    response = await client.put(f"/keys?{query}")

    assert response.status_code == 400
    await problem(response)
    before, now = unchanged()
    assert now == before


async def test_value_that_is_one_large_string_is_413(
    client: QuartClient, unchanged: Callable[[], tuple[Snapshot, Snapshot]]
) -> None:
    just_over = b'"' + b"a" * (1024 * 1024 - 1) + b'"'
    whole_body = b'"' + b"a" * (8 * 1024 * 1024) + b'"'

    single = await client.put("/keys/big", data=just_over, headers=JSON_HEADERS)
    bulk = await client.put(
        "/keys", data=b'{"ok":1,"big":' + just_over + b"}", headers=JSON_HEADERS
    )
    body_limit = await client.put("/keys/big", data=whole_body, headers=JSON_HEADERS)

    assert (single.status_code, bulk.status_code) == (413, 413)
    assert "1048576" in (await problem(single))["detail"]
    assert body_limit.status_code == 413
    await problem(body_limit)
    before, now = unchanged()
    assert now == before


async def test_value_of_exactly_the_limit_is_stored(client: QuartClient) -> None:
    largest = b'"' + b"a" * (1024 * 1024 - 2) + b'"'

    stored = await client.put("/keys/largest", data=largest, headers=JSON_HEADERS)
    head = await client.head("/keys/largest")

    assert stored.status_code == 201
    assert head.status_code == 200


async def test_thousands_of_pairs_over_the_limit_are_413_and_none_stored(
    client: QuartClient, unchanged: Callable[[], tuple[Snapshot, Snapshot]]
) -> None:
    pairs = {f"pair-{n}": n for n in range(10_001)}

    response = await client.put("/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS)

    assert response.status_code == 413
    assert "10001 pairs" in (await problem(response))["detail"]
    before, now = unchanged()
    assert now == before


async def test_pairs_up_to_the_limit_are_all_stored(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    pairs = {f"pair-{n}": n for n in range(10_000)}

    response = await client.put(
        "/keys?expire_in=60", data=orjson.dumps(pairs), headers=JSON_HEADERS
    )

    assert response.status_code == 200
    assert await response.get_json() == {"stored": 10_000}
    assert len(list(redis_client.scan_iter(match=f"{key_prefix}pair-*"))) == 10_000


async def test_query_form_pairs_over_the_limit_are_413(
    settings: Settings, unchanged: Callable[[], tuple[Snapshot, Snapshot]]
) -> None:
    app: Quart = create_app(dataclasses.replace(settings, max_pairs=3))
    async with app.test_app():
        response = await app.test_client().put("/keys?a=1&b=2&c=3&d=4")

    assert response.status_code == 413
    before, now = unchanged()
    assert now == before


@pytest.mark.parametrize(
    "pattern",
    [
        "$a" * 9,
        "$" + "x$" * 8 + "y",
        "a" * 1025,
        "a$\x00",
        "",
    ],
    ids=["9-runs", "9-runs-inside", "1025-bytes", "nul", "empty"],
)
async def test_filter_over_the_limits_is_400_for_read_and_delete(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    pattern: str,
) -> None:
    read = await client.get("/keys", query_string={"filter": pattern})
    delete = await client.delete("/keys", query_string={"filter": pattern})

    assert (read.status_code, delete.status_code) == (400, 400)
    await problem(read)
    before, now = unchanged()
    assert now == before


@pytest.mark.parametrize("pattern", ["*", "?eep", "[k]eep", "k[!x]ep", "\\keep", "%"])
async def test_glob_characters_in_a_filter_match_only_themselves(
    client: QuartClient,
    unchanged: Callable[[], tuple[Snapshot, Snapshot]],
    pattern: str,
) -> None:
    read = await client.get("/keys", query_string={"filter": pattern})
    delete = await client.delete("/keys", query_string={"filter": pattern})

    assert await read.get_json() == {}
    assert await delete.get_json() == {"deleted": 0}
    before, now = unchanged()
    assert now == before


async def test_runs_of_dollars_count_once_and_match_everything(
    client: QuartClient, unchanged: Callable[[], tuple[Snapshot, Snapshot]]
) -> None:
    response = await client.get("/keys", query_string={"filter": "$" * 1000})

    assert response.status_code == 200
    assert await response.get_json() == {"keep": "kept", "brief": 1}
    before, now = unchanged()
    assert now == before
