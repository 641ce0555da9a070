"""Bad requests: each gets a clear 4xx problem and writes nothing."""

import dataclasses
from collections.abc import AsyncIterator

import orjson
import pytest
import redis
from quart import Quart, Response
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.embedded import free_port
from kvstore.settings import Settings

JSON_HEADERS = {"Content-Type": "application/json"}


async def assert_problem(response: Response, status: int, detail_part: str) -> None:
    assert response.status_code == status
    body = await response.get_json()
    assert response.content_type == "application/problem+json"
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert detail_part in body["detail"]


def keys_in(redis_client: redis.Redis, key_prefix: str) -> list[bytes]:
    return sorted(redis_client.scan_iter(match=f"{key_prefix}*"))


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/keys/k", b"{not json", "not valid JSON"),
        ("/keys/k", b'{"a": 1', "not valid JSON"),
        ("/keys/k", b"NaN", "not valid JSON"),
        ("/keys/k", b"1e400", "not valid JSON"),
        ("/keys/k", b'"\xff"', "not valid JSON"),
        ("/keys/k", b"[1] [2]", "not valid JSON"),
        ("/keys", b"[1, 2]", "JSON object"),
        ("/keys", b'"text"', "JSON object"),
        ("/keys", b"null", "JSON object"),
        ("/keys", b"{}", "at least one key"),
        ("/keys", b'{"": 1}', "must not be empty"),
        ("/keys", b'{"a\\u0000b": 1}', "control characters"),
        ("/keys", b"{bad", "not valid JSON"),
    ],
)
async def test_malformed_bodies_are_400_and_write_nothing(
    client: QuartClient,
    redis_client: redis.Redis,
    key_prefix: str,
    path: str,
    body: bytes,
    detail: str,
) -> None:
    response = await client.put(path, data=body, headers=JSON_HEADERS)

    await assert_problem(response, 400, detail)
    assert keys_in(redis_client, key_prefix) == []


async def test_empty_body_for_one_key_is_400(client: QuartClient) -> None:
    response = await client.put("/keys/k", data=b"", headers=JSON_HEADERS)

    await assert_problem(response, 400, "one JSON value")


async def test_value_nested_too_deeply_is_400(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    deep = b"[" * 300 + b"]" * 300
    deepest_allowed = b"[" * 254 + b"]" * 254

    response = await client.put("/keys/deep", data=deep, headers=JSON_HEADERS)
    allowed = await client.put("/keys/ok", data=deepest_allowed, headers=JSON_HEADERS)

    await assert_problem(response, 400, "nested too deeply")
    assert allowed.status_code == 201
    assert keys_in(redis_client, key_prefix) == [f"{key_prefix}ok".encode()]


@pytest.mark.parametrize(
    "expire_in",
    ["0", "-1", "1.5", "abc", "", "1e3", "+5", " 5", "315360001", "9" * 5000],
)
async def test_bad_expire_in_is_400_and_writes_nothing(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str, expire_in: str
) -> None:
    one = await client.put(
        f"/keys/k?expire_in={expire_in}", data=b"1", headers=JSON_HEADERS
    )
    many = await client.put(
        f"/keys?expire_in={expire_in}", data=b'{"a": 1}', headers=JSON_HEADERS
    )
    query_form = await client.put(f"/keys?a=1&expire_in={expire_in}")

    for response in (one, many, query_form):
        await assert_problem(response, 400, "expire_in")
    assert keys_in(redis_client, key_prefix) == []


async def test_largest_expire_in_is_accepted(client: QuartClient) -> None:
    response = await client.put(
        "/keys/k?expire_in=315360000", data=b"1", headers=JSON_HEADERS
    )

    assert response.status_code == 201


async def test_repeated_expire_in_is_400(client: QuartClient) -> None:
    response = await client.put(
        "/keys/k?expire_in=5&expire_in=6", data=b"1", headers=JSON_HEADERS
    )

    await assert_problem(response, 400, "given twice")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded"]
)
async def test_json_body_without_json_content_type_is_415(
    client: QuartClient,
    redis_client: redis.Redis,
    key_prefix: str,
    content_type: str | None,
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}

    one = await client.put("/keys/k", data=b"1", headers=headers)
    many = await client.put("/keys", data=b'{"a": 1}', headers=headers)

    for response in (one, many):
        await assert_problem(response, 415, "application/json")
    assert keys_in(redis_client, key_prefix) == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/merge+json"],
)
async def test_json_content_types_are_accepted(
    client: QuartClient, content_type: str
) -> None:
    response = await client.put(
        "/keys/k", data=b"1", headers={"Content-Type": content_type}
    )

    assert response.status_code == 201


@pytest.fixture
async def small_client(settings: Settings) -> AsyncIterator[QuartClient]:
    """A client of an app with tiny limits."""
    limited = dataclasses.replace(
        settings, max_body_bytes=1000, max_value_bytes=100, max_pairs=3
    )
    app = create_app(limited)
    async with app.test_app():
        yield app.test_client()


async def test_body_over_the_limit_is_413(
    small_client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    body = orjson.dumps({"a": "x" * 2000})

    response = await small_client.put("/keys", data=body, headers=JSON_HEADERS)

    assert response.status_code == 413
    assert response.content_type == "application/problem+json"
    assert keys_in(redis_client, key_prefix) == []


async def test_value_over_the_limit_is_413(
    small_client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    value = orjson.dumps("x" * 99)

    response = await small_client.put("/keys/k", data=value, headers=JSON_HEADERS)
    limit = await small_client.put(
        "/keys/k", data=value[:-2] + b'"', headers=JSON_HEADERS
    )

    await assert_problem(response, 413, "at most 100")
    assert limit.status_code == 201


async def test_too_many_pairs_is_413(
    small_client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    pairs = orjson.dumps({"a": 1, "b": 2, "c": 3, "d": 4})

    response = await small_client.put("/keys", data=pairs, headers=JSON_HEADERS)
    query_form = await small_client.put("/keys?a=1&b=2&c=3&d=4")

    await assert_problem(response, 413, "at most 3")
    await assert_problem(query_form, 413, "at most 3")
    assert keys_in(redis_client, key_prefix) == []


async def test_unknown_path_is_404_problem(client: QuartClient) -> None:
    response = await client.get("/nothing/here")

    await assert_problem(response, 404, "no such resource")


@pytest.fixture
async def unreachable_app(settings: Settings) -> AsyncIterator[Quart]:
    """An app whose Redis is a port where nothing listens."""
    dead = dataclasses.replace(
        settings,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_timeout=0.5,
        redis_connect_timeout=0.2,
        retry_after=3,
    )
    app = create_app(dead)
    async with app.test_app():
        yield app


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/keys/k"),
        ("HEAD", "/keys/k"),
        ("PUT", "/keys/k"),
        ("DELETE", "/keys/k"),
        ("GET", "/keys"),
        ("PUT", "/keys"),
        ("DELETE", "/keys"),
        ("GET", "/readyz"),
    ],
)
async def test_unreachable_redis_is_503_with_retry_after(
    unreachable_app: Quart, method: str, path: str
) -> None:
    client = unreachable_app.test_client()
    body = b'{"a": 1}' if path == "/keys" else b"1"

    send = getattr(client, method.lower())
    response = await send(path, data=body, headers=JSON_HEADERS)

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    if method != "HEAD":
        problem = await response.get_json()
        assert problem["status"] == 503
        assert "Redis" in problem["detail"]


async def test_unreachable_redis_leaves_healthz_up(unreachable_app: Quart) -> None:
    response = await unreachable_app.test_client().get("/healthz")

    assert response.status_code == 200
