"""``/metrics``: the exposition, request and store metrics, against real Redis."""

import asyncio
import platform
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore import __version__
from kvstore.app import create_app
from kvstore.embedded import EmbeddedRedis, free_port
from kvstore.metrics import LATENCY_BUCKETS
from kvstore.settings import Settings
from kvstore.store import ERROR_KINDS
from tests.helpers import need_redis_7
from tests.observability import families, parse_samples, value_of

JSON_HEADERS = {"Content-Type": "application/json"}
KEY_ROUTE = "/keys/{id}"


async def scrape(client: QuartClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return await response.get_data(as_text=True)


async def test_exposition_is_prometheus_text_that_a_real_parser_reads(
    client: QuartClient,
) -> None:
    await client.put("/keys/a", data=b"1", headers=JSON_HEADERS)

    response = await client.get("/metrics")
    text = await response.get_data(as_text=True)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert families(text) == {
        "kvstore_http_requests": "counter",
        "kvstore_http_request_duration_seconds": "histogram",
        "kvstore_redis_command_duration_seconds": "histogram",
        "kvstore_redis_errors": "counter",
        "kvstore_redis_up": "gauge",
        "kvstore_redis_pool_connections": "gauge",
        "kvstore_redis_pool_max_connections": "gauge",
        "kvstore_keys_written": "counter",
        "kvstore_keys_read": "counter",
        "kvstore_key_misses": "counter",
        "kvstore_keys_expired_on_read": "counter",
        "kvstore_keys_deleted": "counter",
        "kvstore_value_written_bytes": "counter",
        "kvstore_value_read_bytes": "counter",
        "kvstore_wildcard_read_keys": "histogram",
        "kvstore_build_info": "gauge",
        "kvstore_worker_processes": "gauge",
        "process_start_time_seconds": "gauge",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
    }


async def test_counters_move_by_exactly_the_requests_made(client: QuartClient) -> None:
    before = await scrape(client)

    for index in range(7):
        await client.put(f"/keys/k{index}", data=b"1", headers=JSON_HEADERS)
    for index in range(3):
        await client.get(f"/keys/k{index}")
    await client.get("/keys/absent")
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value_of(after, name, **labels) - value_of(before, name, **labels)

    put = {"method": "PUT", "route": KEY_ROUTE, "status": "201"}
    hit = {"method": "GET", "route": KEY_ROUTE, "status": "200"}
    miss = {"method": "GET", "route": KEY_ROUTE, "status": "404"}
    assert moved("kvstore_http_requests_total", **put) == 7
    assert moved("kvstore_http_requests_total", **hit) == 3
    assert moved("kvstore_http_requests_total", **miss) == 1
    assert moved("kvstore_http_request_duration_seconds_count", **put) == 7
    assert moved("kvstore_http_request_duration_seconds_bucket", le="+Inf", **hit) == 3
    assert moved("kvstore_keys_written_total") == 7
    assert moved("kvstore_keys_read_total") == 3
    assert moved("kvstore_key_misses_total") == 1
    assert moved("kvstore_redis_command_duration_seconds_count", operation="put") == 7
    assert moved("kvstore_redis_command_duration_seconds_count", operation="get") == 4


async def test_series_stay_constant_as_distinct_keys_are_requested(
    client: QuartClient,
) -> None:
    async def touch(keys: list[str]) -> None:
        for key in keys:
            await client.put(f"/keys/{key}", data=b"1", headers=JSON_HEADERS)
            await client.get(f"/keys/{key}")
            await client.head(f"/keys/{key}")
            await client.delete(f"/keys/{key}")
            await client.get(f"/keys/{key}")

    await touch([f"first-{index}" for index in range(5)])
    await scrape(client)
    first = await scrape(client)
    await touch([f"second-{uuid.uuid4().hex}" for _ in range(60)])
    second = await scrape(client)

    def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (sample.name, tuple(sorted(sample.labels.items())))
            for sample in parse_samples(text)
        }

    assert series(second) == series(first)
    assert "second-" not in second
    routes = {sample.labels.get("route") for sample in parse_samples(second)}
    assert routes == {None, KEY_ROUTE, "/metrics"}


async def test_unknown_methods_and_paths_get_one_label_each(
    client: QuartClient,
) -> None:
    for index in range(4):
        await client.open(f"/nowhere/{index}", method=f"BREW{index}", json=None)
        await client.get(f"/other/path/{index}")

    text = await scrape(client)

    samples = [
        sample
        for sample in parse_samples(text)
        if sample.name == "kvstore_http_requests_total"
    ]
    methods = {sample.labels["method"] for sample in samples}
    routes = {sample.labels["route"] for sample in samples}
    assert methods == {"other", "GET"}
    assert routes == {"other"}
    assert value_of(text, "kvstore_http_requests_total", route="other") == 8


async def test_store_metrics_count_keys_and_value_bytes(client: QuartClient) -> None:
    bulk = {"a": [1, 2], "b": "text", "c": None}
    before = await scrape(client)

    await client.put("/keys", data=orjson.dumps(bulk), headers=JSON_HEADERS)
    await client.put("/keys/d", data=b'{"x": 1}', headers=JSON_HEADERS)
    await client.get("/keys/a")
    await client.head("/keys/b")
    await client.get("/keys/nope")
    await client.delete("/keys/d")
    await client.delete("/keys/nope")
    deleted = await client.delete("/keys", query_string={"filter": "$"})
    after = await scrape(client)

    def moved(name: str) -> float:
        return value_of(after, name) - value_of(before, name)

    assert await deleted.get_json() == {"deleted": 3}
    assert moved("kvstore_keys_written_total") == 4
    assert moved("kvstore_value_written_bytes_total") == len(b'[1,2]"text"null{"x":1}')
    assert moved("kvstore_keys_read_total") == 2
    assert moved("kvstore_value_read_bytes_total") == len(b"[1,2]")
    assert moved("kvstore_key_misses_total") == 1
    assert moved("kvstore_keys_deleted_total") == 4


async def test_wildcard_reads_observe_how_many_keys_they_return(
    client: QuartClient,
) -> None:
    pairs = {f"w{index}": index for index in range(12)}
    await client.put("/keys", data=orjson.dumps(pairs), headers=JSON_HEADERS)
    before = await scrape(client)

    everything = await client.get("/keys", query_string={"filter": "w$"})
    one = await client.get("/keys", query_string={"filter": "w1"})
    none = await client.get("/keys", query_string={"filter": "zzz$"})
    await everything.get_data()
    await one.get_data()
    await none.get_data()
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value_of(after, name, **labels) - value_of(before, name, **labels)

    histogram = "kvstore_wildcard_read_keys"
    assert moved(f"{histogram}_count") == 3
    assert moved(f"{histogram}_sum") == 13
    assert moved(f"{histogram}_bucket", le="0.0") == 1
    assert moved(f"{histogram}_bucket", le="1.0") == 2
    assert moved(f"{histogram}_bucket", le="10.0") == 2
    assert moved(f"{histogram}_bucket", le="100.0") == 3
    assert moved("kvstore_keys_read_total") == 13


async def test_latency_buckets_resolve_sub_millisecond_to_seconds(
    client: QuartClient,
) -> None:
    await client.get("/healthz")

    text = await scrape(client)

    bounds = {
        float(sample.labels["le"])
        for sample in parse_samples(text)
        if sample.name == "kvstore_http_request_duration_seconds_bucket"
    }
    assert min(bounds) <= 0.0001
    assert {0.0005, 0.001, 0.01, 0.1, 1.0} <= bounds
    assert max(bound for bound in bounds if bound != float("inf")) >= 10
    assert tuple(sorted(LATENCY_BUCKETS)) == LATENCY_BUCKETS


async def test_pool_redis_and_build_gauges_describe_this_process(
    client: QuartClient, settings: Settings
) -> None:
    await client.get("/readyz")

    text = await scrape(client)

    (build,) = [s for s in parse_samples(text) if s.name == "kvstore_build_info"]
    assert build.value == 1
    assert build.labels == {
        "version": __version__,
        "python_version": platform.python_version(),
    }
    assert value_of(text, "kvstore_redis_up") == 1
    assert value_of(text, "kvstore_worker_processes") == 1
    limit = value_of(text, "kvstore_redis_pool_max_connections")
    in_use = value_of(text, "kvstore_redis_pool_connections", state="in_use")
    idle = value_of(text, "kvstore_redis_pool_connections", state="idle")
    assert limit == settings.redis_max_connections
    assert idle >= 1
    assert in_use + idle <= limit
    started = value_of(text, "process_start_time_seconds")
    assert time.time() - 24 * 3600 < started <= time.time()
    assert value_of(text, "process_cpu_seconds_total") > 0
    assert value_of(text, "process_resident_memory_bytes") > 1_000_000
    assert value_of(text, "process_open_fds") > 0


@pytest.fixture
async def unreachable_app(settings: Settings) -> AsyncIterator[Quart]:
    """An app whose Redis URL points at a port nobody listens on."""
    dead = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        key_prefix=settings.key_prefix,
        redis_retries=0,
        redis_timeout=1.0,
    )
    application = create_app(dead)
    async with application.test_app():
        yield application


async def test_unreachable_redis_is_counted_by_kind_and_reported_down(
    unreachable_app: Quart,
) -> None:
    client = unreachable_app.test_client()

    response = await client.get("/keys/anything")
    text = await scrape(client)

    assert response.status_code == 503
    assert value_of(text, "kvstore_redis_up") == 0
    # One failed read, then the scrape's own PING.
    assert value_of(text, "kvstore_redis_errors_total", kind="connection") == 2
    for kind in ERROR_KINDS:
        assert f'kvstore_redis_errors_total{{kind="{kind}"}}' in text
    assert (
        value_of(
            text,
            "kvstore_http_requests_total",
            method="GET",
            route=KEY_ROUTE,
            status="503",
        )
        == 1
    )


@pytest.fixture(scope="module")
def lazy_expiry_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server that removes expired keys only when they are touched."""
    need_redis_7()
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("lazy-redis"),
        persist=False,
        supervise=False,
        extra_args=("--enable-debug-command", "local"),
    )
    url = server.start()
    with redis.Redis.from_url(url) as client:
        client.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", "0")
    yield url
    server.stop()


async def test_reads_that_meet_an_expired_key_are_counted(
    lazy_expiry_redis: str, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=lazy_expiry_redis, key_prefix="lazy:", data_dir=tmp_path
    )
    application = create_app(settings)
    with redis.Redis.from_url(lazy_expiry_redis) as direct:
        direct.set("lazy:gone", b"1", px=1)
        direct.set("lazy:head", b"1", px=1)
    await asyncio.sleep(0.05)

    async with application.test_app():
        client = application.test_client()
        first = await client.get("/keys/gone")
        second = await client.get("/keys/gone")
        head = await client.head("/keys/head")
        text = await scrape(client)

    assert (first.status_code, second.status_code, head.status_code) == (404, 404, 404)
    assert value_of(text, "kvstore_keys_expired_on_read_total") == 2
    assert value_of(text, "kvstore_key_misses_total") == 3


async def test_naming_follows_prometheus_conventions(client: QuartClient) -> None:
    await client.get("/keys", query_string={"filter": "$"})
    text = await scrape(client)

    declared = families(text)
    lines = text.splitlines()
    helps = {
        line.split(" ", 3)[2]: line.split(" ", 3)[3]
        for line in lines
        if line.startswith("# HELP")
    }
    types = {
        line.split(" ")[2]: line.split(" ")[3]
        for line in lines
        if line.startswith("# TYPE")
    }
    for name, kind in types.items():
        assert re.fullmatch(r"(kvstore|process)_[a-z0-9_]+", name), name
        assert helps[name].endswith("."), name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if "duration" in name or "time" in name:
            assert name.endswith(("_seconds", "_seconds_total")), name
        assert not re.search(r"milli|micro|kilo|mega|_ms\b|_kb\b", name), name
        if "bytes" in name:
            assert name.endswith(("_bytes", "_bytes_total")), name
    assert len(declared) == len(types)


def test_promtool_finds_no_lint_problems_in_the_exposition(
    live_url: str,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    httpx.put(f"{live_url}/keys/lint", content=b"1", headers=JSON_HEADERS)
    httpx.get(f"{live_url}/keys", params={"filter": "lint$"})
    exposition = httpx.get(f"{live_url}/metrics").text

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.encode(),
        capture_output=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b""
