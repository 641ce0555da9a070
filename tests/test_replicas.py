"""Several ``kvstore serve`` processes on one Redis: a stateless HTTP tier.

Two processes share nothing but the Redis deployment and the key prefix; what
one writes the other serves at once, on every topology.
"""

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from tests.topologies import JSON_HEADERS, RedisTopology, remove_prefix, serve_process


@pytest.fixture(scope="session")
def replica_urls(
    redis_topology: RedisTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """Two ``kvstore serve`` processes on the topology, with the same prefix."""
    prefix = f"kvreplicas:{uuid.uuid4().hex[:12]}:"
    logs = tmp_path_factory.mktemp("replicas")
    with (
        serve_process(redis_topology, prefix, logs / "first.log") as first,
        serve_process(redis_topology, prefix, logs / "second.log") as second,
    ):
        yield first, second
    client = redis_topology.client()
    try:
        remove_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
async def replicas(
    replica_urls: tuple[str, str],
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """HTTP clients of the two processes."""
    first_url, second_url = replica_urls
    async with (
        httpx.AsyncClient(base_url=first_url) as first,
        httpx.AsyncClient(base_url=second_url) as second,
    ):
        yield first, second


async def test_each_process_serves_what_the_other_wrote(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = replicas
    key = uuid.uuid4().hex

    created = await first.put(f"/keys/{key}", content=b'{"n": 1}', headers=JSON_HEADERS)
    read = await second.get(f"/keys/{key}")
    replaced = await second.put(f"/keys/{key}", content=b"2", headers=JSON_HEADERS)
    reread = await first.get(f"/keys/{key}")
    deleted = await first.delete(f"/keys/{key}")
    gone = await second.get(f"/keys/{key}")

    assert created.status_code == 201
    assert read.json() == {key: {"n": 1}}
    assert replaced.status_code == 200
    assert reread.json() == {key: 2}
    assert deleted.status_code == 204
    assert gone.status_code == 404


async def test_bulk_writes_and_wildcard_reads_agree_across_processes(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = replicas
    tag = uuid.uuid4().hex[:8]
    pairs = {f"{tag}-{index}": index for index in range(200)}

    stored = await first.put("/keys", content=orjson.dumps(pairs), headers=JSON_HEADERS)
    seen_by_second = await second.get("/keys", params={"filter": f"{tag}-$"})
    removed = await second.delete("/keys", params={"filter": f"{tag}-$"})
    seen_by_first = await first.get("/keys", params={"filter": f"{tag}-$"})

    assert stored.json() == {"stored": 200}
    assert seen_by_second.json() == pairs
    assert removed.json() == {"deleted": 200}
    assert seen_by_first.json() == {}


async def test_both_processes_are_ready(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    responses = [await client.get("/readyz") for client in replicas]

    assert [response.status_code for response in responses] == [200, 200]
