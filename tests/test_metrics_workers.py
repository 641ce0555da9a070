"""Metrics of several worker processes: every scrape covers all of them."""

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from quart import Quart

from kvstore import metrics
from kvstore.app import create_app
from kvstore.embedded import free_port
from kvstore.settings import Settings
from tests.observability import kvstore_server, value_of

JSON_HEADERS = {"Content-Type": "application/json"}
PUT_KEY = {"method": "PUT", "route": "/keys/{id}", "status": "201"}


@pytest.fixture
def exchange_dir() -> Iterator[Path]:
    """A short directory path, as unix socket paths must be short."""
    with tempfile.TemporaryDirectory(prefix="kvm-") as directory:
        yield Path(directory)


def worker_app(settings: Settings, exchange_dir: Path) -> Quart:
    """An app as one of several workers would build it."""
    return create_app(
        Settings(
            redis_url=settings.redis_url,
            key_prefix=settings.key_prefix,
            data_dir=settings.data_dir,
            metrics_dir=exchange_dir,
        )
    )


async def put_keys(app: Quart, count: int, prefix: str) -> None:
    client = app.test_client()
    for index in range(count):
        response = await client.put(
            f"/keys/{prefix}{index}", data=b"1", headers=JSON_HEADERS
        )
        assert response.status_code == 201


def suffixes(directory: Path) -> list[str]:
    return sorted(path.suffix for path in directory.iterdir())


async def scrape(app: Quart) -> str:
    response = await app.test_client().get("/metrics")
    assert response.status_code == 200
    return await response.get_data(as_text=True)


async def test_each_worker_scrape_adds_up_every_worker(
    settings: Settings, exchange_dir: Path
) -> None:
    first = worker_app(settings, exchange_dir)
    second = worker_app(settings, exchange_dir)

    async with first.test_app(), second.test_app():
        await put_keys(first, 3, "first-")
        await put_keys(second, 5, "second-")
        from_first = await scrape(first)
        from_second = await scrape(second)

    assert value_of(from_first, "kvstore_http_requests_total", **PUT_KEY) == 8
    assert value_of(from_second, "kvstore_http_requests_total", **PUT_KEY) == 8
    assert value_of(from_first, "kvstore_keys_written_total") == 8
    assert value_of(from_first, "kvstore_value_written_bytes_total") == 8
    assert (
        value_of(from_first, "kvstore_http_request_duration_seconds_count", **PUT_KEY)
        == 8
    )
    assert value_of(from_first, "kvstore_worker_processes") == 2
    assert value_of(from_second, "kvstore_worker_processes") == 2
    # Each pool holds at least one idle connection; both pools are counted.
    assert value_of(from_first, "kvstore_redis_pool_max_connections") == 2 * 64


async def test_an_exited_worker_still_counts_and_its_gauges_leave(
    settings: Settings, exchange_dir: Path
) -> None:
    staying = worker_app(settings, exchange_dir)
    leaving = worker_app(settings, exchange_dir)

    async with staying.test_app():
        async with leaving.test_app():
            await put_keys(leaving, 4, "leaving-")
        await put_keys(staying, 2, "staying-")
        text = await scrape(staying)

    assert value_of(text, "kvstore_http_requests_total", **PUT_KEY) == 6
    assert value_of(text, "kvstore_worker_processes") == 1
    assert value_of(text, "kvstore_redis_pool_max_connections") == 64
    assert suffixes(exchange_dir) == [".json", ".json"]


async def test_a_socket_left_by_a_dead_worker_is_ignored_and_removed(
    settings: Settings, exchange_dir: Path
) -> None:
    stale = exchange_dir / "99999-dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as orphan:
        orphan.bind(str(stale))
    app = worker_app(settings, exchange_dir)

    async with app.test_app():
        await put_keys(app, 1, "alone-")
        text = await scrape(app)

    assert value_of(text, "kvstore_http_requests_total", **PUT_KEY) == 1
    assert value_of(text, "kvstore_worker_processes") == 1
    assert not stale.exists()


async def test_a_worker_that_does_not_answer_fails_the_scrape_with_503(
    settings: Settings, exchange_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "PEER_TIMEOUT", 0.2)
    app = worker_app(settings, exchange_dir)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(exchange_dir / "99999-silent.sock"))
        silent.listen()
        async with app.test_app():
            response = await app.test_client().get("/metrics")
            body = await response.get_json()

    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "did not hand over" in body["detail"]


async def test_metrics_listener_serves_only_metrics(settings: Settings) -> None:
    app = create_app(
        Settings(
            redis_url=settings.redis_url,
            key_prefix=settings.key_prefix,
            metrics_bind="127.0.0.1:9187",
        )
    )
    metrics_port = {"server": ("127.0.0.1", 9187)}

    async with app.test_app():
        client = app.test_client()
        on_main = await client.get("/metrics")
        on_metrics = await client.get("/metrics", scope_base=metrics_port)
        key_on_metrics = await client.get("/keys/a", scope_base=metrics_port)
        health_on_main = await client.get("/healthz")

    assert on_main.status_code == 404
    assert on_metrics.status_code == 200
    assert key_on_metrics.status_code == 404
    assert health_on_main.status_code == 200


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
def test_a_server_of_two_workers_answers_every_scrape_in_full(
    redis_url: str, key_prefix: str, tmp_path: Path, exchange_dir: Path, server: str
) -> None:
    port, metrics_port = free_port(), free_port()
    environ = {
        "KVSTORE_SERVER": server,
        "KVSTORE_REDIS_URL": redis_url,
        "KVSTORE_KEY_PREFIX": key_prefix,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_METRICS_DIR": str(exchange_dir),
        "KVSTORE_WORKERS": "2",
        "KVSTORE_ACCESS_LOG": "false",
    }
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"{url}/metrics"
    if server == "hypercorn":
        # Hypercorn also serves the metrics on a listener of their own.
        environ["KVSTORE_METRICS_BIND"] = f"127.0.0.1:{metrics_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    requests = 30

    with kvstore_server(environ, tmp_path / "kvstore.log", health_url=url):
        for index in range(requests):
            # A new connection each time, so the kernel spreads them over
            # both workers.
            response = httpx.put(
                f"{url}/keys/spread-{index}", content=b"1", headers=JSON_HEADERS
            )
            assert response.status_code == 201
        scrapes = [httpx.get(metrics_url).text for _ in range(6)]
        on_main_port = httpx.get(f"{url}/metrics")
        running = suffixes(exchange_dir)

    for text in scrapes:
        assert value_of(text, "kvstore_http_requests_total", **PUT_KEY) == requests
        assert value_of(text, "kvstore_keys_written_total") == requests
        assert value_of(text, "kvstore_worker_processes") == 2
    assert on_main_port.status_code == (404 if server == "hypercorn" else 200)
    assert running == [".sock", ".sock"]
    assert suffixes(exchange_dir) == [".json", ".json"]
