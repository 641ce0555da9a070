"""Single keys: ``PUT``, ``GET``, ``HEAD`` and ``DELETE /keys/{id}``."""

from typing import Any

import orjson
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from tests.helpers import asgi_request

JSON_HEADERS = {"Content-Type": "application/json"}

VALUES: list[Any] = [
    "text",
    "",
    0,
    -12,
    3.5,
    True,
    False,
    None,
    [],
    [1, "two", [3.0]],
    {},
    {"nested": {"list": [1, 2], "ok": True, "none": None}},
    "unicode ✓ ü 中",
]


async def put(
    client: QuartClient, key: str, value: Any, query: str = ""
) -> tuple[int, Any]:
    response = await client.put(
        f"/keys/{key}{query}", data=orjson.dumps(value), headers=JSON_HEADERS
    )
    return response.status_code, await response.get_json()


@pytest.mark.parametrize("value", VALUES)
async def test_put_then_get_returns_the_same_json_value(
    client: QuartClient, value: Any
) -> None:
    status, body = await put(client, "k", value)

    response = await client.get("/keys/k")

    assert status == 201
    assert body == {"stored": 1}
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert await response.get_json() == {"k": value}
    assert "Expires-In" not in response.headers


async def test_put_stores_compact_json_under_the_prefix(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    await client.put(
        "/keys/doc", data=b'{ "a" : [1, 2] ,\n "b": null }', headers=JSON_HEADERS
    )

    stored = redis_client.get(f"{key_prefix}doc")

    assert stored == b'{"a":[1,2],"b":null}'


async def test_put_existing_key_returns_200_and_replaces(client: QuartClient) -> None:
    first, _ = await put(client, "k", 1)

    second, body = await put(client, "k", 2)
    response = await client.get("/keys/k")

    assert (first, second) == (201, 200)
    assert body == {"stored": 1}
    assert await response.get_json() == {"k": 2}


async def test_put_created_sets_location(client: QuartClient) -> None:
    response = await client.put("/keys/a%2Fb c", data=b"1", headers=JSON_HEADERS)

    assert response.status_code == 201
    assert response.headers["Location"] == "/keys/a%2Fb%20c"


async def test_empty_string_is_a_value_and_the_key_exists(
    client: QuartClient,
) -> None:
    await put(client, "empty", "")

    head = await client.head("/keys/empty")
    get = await client.get("/keys/empty")

    assert head.status_code == 200
    assert await get.get_json() == {"empty": ""}


async def test_get_missing_key_returns_404_problem(client: QuartClient) -> None:
    response = await client.get("/keys/missing")

    body = await response.get_json()
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert body["status"] == 404
    assert body["title"] == "Not Found"
    assert "missing" in body["detail"]
    assert body["type"] == "about:blank"


async def test_head_has_get_headers_and_no_body(
    app: Quart, client: QuartClient
) -> None:
    await put(client, "h", {"x": [1, 2, 3]}, "?expire_in=100")

    head_status, head_headers, head_body = await asgi_request(app, "HEAD", "/keys/h")
    get_status, get_headers, get_body = await asgi_request(app, "GET", "/keys/h")

    assert (head_status, get_status) == (200, 200)
    assert head_body == b""
    assert head_headers[b"content-length"] == str(len(get_body)).encode()
    assert head_headers[b"content-length"] == get_headers[b"content-length"]
    assert head_headers[b"content-type"] == get_headers[b"content-type"]
    assert head_headers[b"expires-in"] == get_headers[b"expires-in"] == b"100"


async def test_head_missing_key_returns_404(client: QuartClient) -> None:
    response = await client.head("/keys/missing")

    assert response.status_code == 404


async def test_delete_existing_key_returns_204_and_removes_it(
    client: QuartClient,
) -> None:
    await put(client, "gone", 1)

    response = await client.delete("/keys/gone")
    after = await client.get("/keys/gone")

    assert response.status_code == 204
    assert await response.get_data() == b""
    assert after.status_code == 404


async def test_delete_missing_key_returns_404(client: QuartClient) -> None:
    response = await client.delete("/keys/never")

    assert response.status_code == 404
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/keys/a%2Fb", "a/b"),
        ("/keys/a/b/c", "a/b/c"),
        ("/keys/dir//double", "dir//double"),
        ("/keys/trailing/", "trailing/"),
        ("/keys/sp%20ace", "sp ace"),
        ("/keys/%E2%9C%93", "✓"),
        ("/keys/*%3F[]%5C", "*?[]\\"),
    ],
)
async def test_keys_are_percent_decoded_once_and_may_contain_slashes(
    client: QuartClient, path: str, key: str
) -> None:
    put_response = await client.put(path, data=b'"v"', headers=JSON_HEADERS)

    response = await client.get(path)

    assert put_response.status_code == 201
    assert await response.get_json() == {key: "v"}


async def test_key_of_max_bytes_is_accepted_and_one_more_is_400(
    client: QuartClient,
) -> None:
    longest = "é" * 512

    ok = await client.put(f"/keys/{longest}", data=b"1", headers=JSON_HEADERS)
    too_long = await client.put(f"/keys/{longest}x", data=b"1", headers=JSON_HEADERS)

    assert ok.status_code == 201
    assert too_long.status_code == 400
    assert "1024" in (await too_long.get_json())["detail"]


@pytest.mark.parametrize("path", ["/keys/%00", "/keys/%1B[31m", "/keys/a%7F"])
async def test_control_characters_in_keys_are_400(
    client: QuartClient, redis_client: redis.Redis, key_prefix: str, path: str
) -> None:
    response = await client.put(path, data=b"1", headers=JSON_HEADERS)

    assert response.status_code == 400
    assert "control" in (await response.get_json())["detail"]
    assert list(redis_client.scan_iter(match=f"{key_prefix}*")) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_empty_key_is_400(client: QuartClient, method: str) -> None:
    response = await getattr(client, method.lower())("/keys/")

    assert response.status_code == 400
    assert "empty" in (await response.get_json())["detail"]


async def test_unsupported_method_is_405_with_allow(client: QuartClient) -> None:
    response = await client.post("/keys/k", data=b"1", headers=JSON_HEADERS)

    body = await response.get_json()
    assert response.status_code == 405
    assert response.content_type == "application/problem+json"
    assert body["status"] == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {
        "GET",
        "HEAD",
        "PUT",
        "DELETE",
    }


async def test_every_response_has_a_request_id(client: QuartClient) -> None:
    ok = await client.get("/healthz")
    missing = await client.get("/keys/missing")
    other = await client.get("/keys/missing")

    assert len(ok.headers["X-Request-ID"]) == 32
    assert missing.headers["X-Request-ID"] != other.headers["X-Request-ID"]


async def test_client_request_id_is_echoed(client: QuartClient) -> None:
    response = await client.get("/keys/x", headers={"X-Request-ID": "abc-123"})

    assert response.headers["X-Request-ID"] == "abc-123"


async def test_unprintable_or_long_request_id_is_replaced(
    client: QuartClient,
) -> None:
    long = await client.get("/healthz", headers={"X-Request-ID": "a" * 200})
    tab = await client.get("/healthz", headers={"X-Request-ID": "a\tb"})

    assert long.headers["X-Request-ID"] != "a" * 200
    assert tab.headers["X-Request-ID"] != "a\tb"
