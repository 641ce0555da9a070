"""The API through a real Hypercorn server: raw paths, HEAD and streaming."""

import uuid

import httpx
import orjson
import pytest

JSON_HEADERS = {"Content-Type": "application/json"}


def unique(name: str) -> str:
    return f"{uuid.uuid4().hex[:8]}-{name}"


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("a%2Fb", "a/b"),
        ("a/b/c", "a/b/c"),
        ("double%252Fencoded", "double%2Fencoded"),
        ("%2541", "%41"),
        ("dir//twice", "dir//twice"),
        ("sp%20ace+plus", "sp ace+plus"),
        ("%E2%9C%93", "✓"),
        ("*%3F%5B%5D%5C", "*?[]\\"),
    ],
)
async def test_key_paths_are_percent_decoded_exactly_once(
    live: httpx.AsyncClient, encoded: str, decoded: str
) -> None:
    prefix = unique("")

    put = await live.put(f"/keys/{prefix}{encoded}", content=b"1", headers=JSON_HEADERS)
    got = await live.get(f"/keys/{prefix}{encoded}")

    assert put.status_code == 201
    assert got.json() == {f"{prefix}{decoded}": 1}


@pytest.mark.parametrize("encoded", ["a%0Ab", "%00", "nul%00byte", "%1B"])
async def test_control_characters_in_key_paths_are_400(
    live: httpx.AsyncClient, encoded: str
) -> None:
    response = await live.put(f"/keys/{encoded}", content=b"1", headers=JSON_HEADERS)

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "control" in response.json()["detail"]


@pytest.mark.parametrize("encoded", ["%FF", "a%C3", "%ED%A0%80"])
async def test_invalid_utf8_in_key_paths_is_400(
    live: httpx.AsyncClient, encoded: str
) -> None:
    response = await live.put(f"/keys/{encoded}", content=b"1", headers=JSON_HEADERS)

    assert response.status_code == 400
    assert "UTF-8" in response.json()["detail"]


async def test_head_content_length_matches_get(live: httpx.AsyncClient) -> None:
    key = unique("head")
    await live.put(f"/keys/{key}", content=b'{"a": "\xc3\xbc"}', headers=JSON_HEADERS)

    head = await live.head(f"/keys/{key}")
    get = await live.get(f"/keys/{key}")

    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["Content-Length"]) == len(get.content)


async def test_large_wildcard_read_is_streamed_and_complete(
    live: httpx.AsyncClient,
) -> None:
    prefix = unique("bulk")
    pairs = {f"{prefix}-{index:05}": {"n": index} for index in range(12_000)}
    for start in range(0, len(pairs), 4000):
        chunk = dict(list(pairs.items())[start : start + 4000])
        stored = await live.put(
            "/keys", content=orjson.dumps(chunk), headers=JSON_HEADERS
        )
        assert stored.status_code == 200

    chunks: list[bytes] = []
    async with live.stream("GET", "/keys", params={"filter": f"{prefix}$"}) as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.headers
        async for raw in response.aiter_raw():
            chunks.append(raw)

    assert len(chunks) > 1
    assert orjson.loads(b"".join(chunks)) == pairs
