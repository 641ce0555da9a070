"""Lifetimes: ``expire_in`` really expires keys, and ``Expires-In`` says when."""

import asyncio

import orjson
from quart.typing import TestClientProtocol as QuartClient

JSON_HEADERS = {"Content-Type": "application/json"}


async def wait_until_gone(client: QuartClient, path: str, limit: float = 5.0) -> float:
    """Poll ``path`` until it is 404; return the seconds waited."""
    waited = 0.0
    while (await client.get(path)).status_code == 200:
        assert waited < limit, f"{path} still exists after {limit} s"
        await asyncio.sleep(0.1)
        waited += 0.1
    return waited


async def test_key_with_expire_in_expires(client: QuartClient) -> None:
    await client.put("/keys/short?expire_in=1", data=b'"v"', headers=JSON_HEADERS)
    before = await client.get("/keys/short")

    await wait_until_gone(client, "/keys/short")
    head = await client.head("/keys/short")
    listed = await (await client.get("/keys")).get_json()
    deleted = await client.delete("/keys/short")

    assert before.status_code == 200
    assert before.headers["Expires-In"] == "1"
    assert head.status_code == 404
    assert listed == {}
    assert deleted.status_code == 404


async def test_bulk_pairs_with_expire_in_expire_together(client: QuartClient) -> None:
    await client.put(
        "/keys?expire_in=1",
        data=orjson.dumps({"a": 1, "b": 2}),
        headers=JSON_HEADERS,
    )
    await client.put("/keys/stays", data=b"3", headers=JSON_HEADERS)

    await wait_until_gone(client, "/keys/a")
    await wait_until_gone(client, "/keys/b")
    remaining = await (await client.get("/keys")).get_json()

    assert remaining == {"stays": 3}


async def test_rewriting_without_expire_in_keeps_the_key(client: QuartClient) -> None:
    await client.put("/keys/k?expire_in=1", data=b"1", headers=JSON_HEADERS)

    await client.put("/keys/k", data=b"2", headers=JSON_HEADERS)
    await asyncio.sleep(1.3)
    response = await client.get("/keys/k")

    assert response.status_code == 200
    assert await response.get_json() == {"k": 2}
    assert "Expires-In" not in response.headers


async def test_expires_in_counts_down_in_whole_seconds(client: QuartClient) -> None:
    await client.put("/keys/k?expire_in=3", data=b"1", headers=JSON_HEADERS)

    first = int((await client.get("/keys/k")).headers["Expires-In"])
    await asyncio.sleep(1.2)
    later = int((await client.get("/keys/k")).headers["Expires-In"])

    assert first == 3
    assert 1 <= later <= 2
