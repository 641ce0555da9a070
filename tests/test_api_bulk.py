"""Many keys at once: ``PUT /keys``, ``GET /keys`` and ``DELETE /keys``."""

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlencode

import orjson
import pytest
import redis
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.settings import Settings
from kvstore.store import Store, StoreUnavailableError
from tests.helpers import asgi_request

JSON_HEADERS = {"Content-Type": "application/json"}


async def put_pairs(client: QuartClient, pairs: dict[str, Any], query: str = "") -> Any:
    response = await client.put(
        f"/keys{query}", data=orjson.dumps(pairs), headers=JSON_HEADERS
    )
    assert response.status_code == 200, await response.get_data()
    return await response.get_json()


async def read_all(client: QuartClient, query: str = "") -> Any:
    response = await client.get(f"/keys{query}")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    return await response.get_json()


async def test_put_many_stores_every_pair(client: QuartClient) -> None:
    pairs = {"a": 1, "b": [True, None], "c": {"d": "e"}, "empty": ""}

    body = await put_pairs(client, pairs)

    assert body == {"stored": 4}
    assert await read_all(client) == pairs


async def test_get_all_with_no_keys_is_an_empty_object(client: QuartClient) -> None:
    assert await read_all(client) == {}


async def test_put_many_with_expire_in_sets_every_lifetime(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    await put_pairs(client, {"x": 1, "y": 2}, "?expire_in=300")

    lifetimes = [redis_client.ttl(f"{key_prefix}{key}") for key in ("x", "y")]
    response = await client.get("/keys/x")

    assert all(290 <= seconds <= 300 for seconds in lifetimes)
    assert response.headers["Expires-In"] == "300"


async def test_put_without_expire_in_clears_an_earlier_expiry(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    await put_pairs(client, {"x": 1}, "?expire_in=300")
    await client.put("/keys/y?expire_in=300", data=b"1", headers=JSON_HEADERS)

    await put_pairs(client, {"x": 2})
    await client.put("/keys/y", data=b"2", headers=JSON_HEADERS)

    assert redis_client.ttl(f"{key_prefix}x") == -1
    assert redis_client.ttl(f"{key_prefix}y") == -1
    assert "Expires-In" not in (await client.get("/keys/x")).headers


async def test_query_string_form_stores_string_values(client: QuartClient) -> None:
    response = await client.put("/keys?name=value&n=42&blank=&sp=a+b&expire_in=60")

    assert response.status_code == 200
    assert await response.get_json() == {"stored": 4}
    assert await read_all(client) == {
        "name": "value",
        "n": "42",
        "blank": "",
        "sp": "a b",
    }
    assert (await client.get("/keys/n")).headers["Expires-In"] == "60"


async def test_query_string_form_without_pairs_is_400(client: QuartClient) -> None:
    response = await client.put("/keys?expire_in=60")

    assert response.status_code == 400
    assert "nothing to store" in (await response.get_json())["detail"]


async def test_json_body_and_query_pairs_together_are_400(
    client: QuartClient,
) -> None:
    response = await client.put("/keys?other=1", data=b'{"a": 1}', headers=JSON_HEADERS)

    assert response.status_code == 400
    assert await read_all(client) == {}


async def test_put_many_is_all_or_nothing_when_one_key_is_bad(
    client: QuartClient,
) -> None:
    response = await client.put(
        "/keys", data=b'{"good": 1, "": 2}', headers=JSON_HEADERS
    )

    assert response.status_code == 400
    assert await read_all(client) == {}


async def test_put_many_is_all_or_nothing_when_one_value_is_too_large(
    client: QuartClient,
) -> None:
    pairs = {"small": 1, "big": "x" * (1024 * 1024)}

    response = await client.put("/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS)

    assert response.status_code == 413
    assert "big" in (await response.get_json())["detail"]
    assert await read_all(client) == {}


@pytest.mark.parametrize(
    "key",
    ["wod", "word", "world", "wo d", "wo$d"],
)
async def test_filter_wildcard_matches_any_run(client: QuartClient, key: str) -> None:
    await put_pairs(client, {key: 1, "sword": 2, "words": 3, "other": 4})

    found = await read_all(client, "?filter=wo$d")

    assert found == {key: 1}


async def test_filter_matches_whole_keys_only(client: QuartClient) -> None:
    await put_pairs(
        client, {"wod": 0, "word": 1, "world": 2, "wo d": 3, "sword": 4, "words": 5}
    )

    found = await read_all(client, "?filter=wo$d")

    assert found == {"wod": 0, "word": 1, "world": 2, "wo d": 3}


async def test_filter_runs_of_wildcards_count_as_one(client: QuartClient) -> None:
    await put_pairs(client, {"ab": 1, "aXb": 2, "b": 3})

    found = await read_all(client, "?filter=a$$$$b")

    assert found == {"ab": 1, "aXb": 2}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a*b", {"a*b": 1}),
        ("a?b", {"a?b": 2}),
        ("[ab]", {"[ab]": 3}),
        ("a\\b", {"a\\b": 4}),
        ("$]", {"[ab]": 3}),
        ("a$b", {"a*b": 1, "a?b": 2, "a\\b": 4, "aab": 5}),
    ],
)
async def test_glob_characters_in_keys_and_filters_are_literal(
    client: QuartClient, pattern: str, expected: dict[str, int]
) -> None:
    await put_pairs(client, {"a*b": 1, "a?b": 2, "[ab]": 3, "a\\b": 4, "aab": 5})

    found = await read_all(client, "?" + _query({"filter": pattern}))

    assert found == expected


async def test_lone_wildcard_matches_every_key(client: QuartClient) -> None:
    await put_pairs(client, {"a": 1, "b": 2})

    assert await read_all(client, "?filter=$") == {"a": 1, "b": 2}


async def test_too_many_wildcards_in_a_filter_is_400(client: QuartClient) -> None:
    allowed = "a$" * 8
    refused = "a$" * 9

    ok = await client.get("/keys?" + _query({"filter": allowed}))
    response = await client.get("/keys?" + _query({"filter": refused}))

    assert ok.status_code == 200
    assert response.status_code == 400
    assert "at most 8" in (await response.get_json())["detail"]


@pytest.mark.parametrize("query", ["?filter=", "?filter=a&filter=b", "?filter=%FF"])
async def test_bad_filters_are_400(client: QuartClient, query: str) -> None:
    response = await client.get(f"/keys{query}")

    assert response.status_code == 400
    assert response.content_type == "application/problem+json"


async def test_delete_all_removes_every_key_and_counts_them(
    client: QuartClient,
) -> None:
    await put_pairs(client, {f"k{index}": index for index in range(2500)})

    response = await client.delete("/keys")

    assert response.status_code == 200
    assert await response.get_json() == {"deleted": 2500}
    assert await read_all(client) == {}


async def test_delete_with_filter_removes_only_matches(client: QuartClient) -> None:
    await put_pairs(client, {"log:1": 1, "log:2": 2, "keep": 3, "log*": 4})

    response = await client.delete("/keys?filter=log:$")

    assert await response.get_json() == {"deleted": 2}
    assert await read_all(client) == {"keep": 3, "log*": 4}


async def test_foreign_keys_are_invisible_and_survive_delete_all(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    foreign = {
        f"other:{key_prefix}": b"1",
        key_prefix.rstrip(":"): b"2",
        f"x{key_prefix}a": b"3",
    }
    redis_client.mset(foreign)
    try:
        await put_pairs(client, {"mine": 1})

        listed = await read_all(client)
        deleted = await (await client.delete("/keys")).get_json()

        assert listed == {"mine": 1}
        assert deleted == {"deleted": 1}
        assert redis_client.mget(list(foreign)) == list(foreign.values())
    finally:
        redis_client.delete(*foreign)


async def test_glob_characters_in_the_prefix_are_literal(
    settings: Settings, redis_client: redis.Redis
) -> None:
    prefix = f"kv*?[x]\\{uuid.uuid4().hex[:8]}:"
    lookalike = prefix.replace("*?[x]\\", "*?x\\") + "a"
    redis_client.set(lookalike, b"1")
    app = create_app(dataclasses.replace(settings, key_prefix=prefix))
    try:
        async with app.test_app():
            client = app.test_client()
            await put_pairs(client, {"a": 1})

            listed = await read_all(client)
            deleted = await (await client.delete("/keys?filter=$")).get_json()

        assert listed == {"a": 1}
        assert deleted == {"deleted": 1}
        assert redis_client.get(lookalike) == b"1"
    finally:
        redis_client.delete(lookalike, f"{prefix}a")


async def test_large_read_returns_every_key_once(client: QuartClient) -> None:
    pairs = {f"key-{index:05}": index for index in range(5000)}
    await put_pairs(client, pairs)

    assert await read_all(client) == pairs


def _query(params: dict[str, str]) -> str:
    return urlencode(params)


class FailingAfterOnePage:
    """A store whose scan loses Redis after the first page."""

    async def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        yield [("a", b"1")]
        raise StoreUnavailableError("Redis is unreachable: ConnectionError")

    async def ping(self) -> None:
        return None


async def test_failure_mid_stream_aborts_the_response_unfinished() -> None:
    app = create_app(
        Settings(redis_url="redis://unused"), store=cast(Store, FailingAfterOnePage())
    )

    sent: list[dict[str, Any]] = []

    async with app.test_app():
        with pytest.raises(StoreUnavailableError):
            await asgi_request(app, "GET", "/keys", sent)

    assert sent[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in sent) == b'{"a":1'
    assert all(message.get("more_body", True) for message in sent[1:])
