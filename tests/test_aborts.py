"""Clients that leave mid-request, by the thousand and all at once.

A request cancelled while its Redis command is on the wire must neither keep
a pooled connection checked out nor leave a reply behind for the next
request on that connection to read as its own. Each completed response
here must carry the value of the key it asked for, and afterwards the pool
is empty and every connection answers its own questions.
"""

import asyncio
import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any, cast

import h11
import orjson
import pytest
import redis
from quart import Quart

from kvstore.app import create_app
from kvstore.settings import Settings
from tests.services import report, running, start_redis

KEYS = 500


def seed(client: redis.Redis, prefix: str) -> None:
    """Store ``KEYS`` keys whose values name their key."""
    client.mset({f"{prefix}key-{n}": orjson.dumps(f"value-{n}") for n in range(KEYS)})


async def asgi_get(
    app: Quart, path: str, leave_after: float | None
) -> tuple[int, bytes] | None:
    """GET ``path`` as a server would; the client leaves after ``leave_after``.

    Returns the status and body of a complete response, or None when the
    client left first.
    """
    messages: list[dict[str, Any]] = []
    complete = asyncio.Event()
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if leave_after is None:
            await complete.wait()
        else:
            await asyncio.sleep(leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    scope = {
        "type": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"kvstore")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 5000),
        "extensions": {},
    }
    await cast(Any, app)(scope, receive, send)
    if not complete.is_set():
        return None
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return messages[0]["status"], body


async def test_cancelled_requests_leave_the_pool_empty_and_replies_matched(
    settings: Settings, redis_client: redis.Redis, key_prefix: str
) -> None:
    seed(redis_client, key_prefix)
    app = create_app(dataclasses.replace(settings, redis_max_connections=8))
    rng = random.Random(20)  # noqa: S311 - a seeded, repeatable test schedule
    completed: list[tuple[int, int, bytes]] = []
    left = cancelled = 0

    async def one(number: int, leave_after: float | None) -> None:
        nonlocal left
        answer = await asgi_get(app, f"/keys/key-{number}", leave_after)
        if answer is None:
            left += 1
        else:
            completed.append((number, *answer))

    async with app.test_app():
        store = app.extensions["kvstore.holder"].store
        for _ in range(20):
            tasks = []
            for _ in range(100):
                leave_after = rng.choice([None, rng.uniform(0, 0.004)])
                task = asyncio.create_task(one(rng.randrange(KEYS), leave_after))
                if rng.random() < 0.25:
                    asyncio.get_running_loop().call_later(
                        rng.uniform(0, 0.004), task.cancel
                    )
                tasks.append(task)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled += sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
            assert [o for o in outcomes if isinstance(o, Exception)] == []
        in_use_after = store.pool_stats().in_use
        checks = [
            await asgi_get(app, f"/keys/key-{number}", None) for number in range(200)
        ]

    report(
        "client-aborts-in-process",
        requests=2000,
        completed=len(completed),
        client_left=left,
        cancelled=cancelled,
        pool_in_use_after=in_use_after,
    )
    assert left + cancelled >= 300
    assert len(completed) >= 300
    for number, status, body in completed:
        assert status == 200
        assert orjson.loads(body) == {f"key-{number}": f"value-{number}"}
    assert in_use_after == 0
    for number, answer in enumerate(checks):
        assert answer is not None
        assert orjson.loads(answer[1]) == {f"key-{number}": f"value-{number}"}


@pytest.mark.slow
async def test_http_clients_that_abort_never_get_another_keys_value(
    tmp_path: Path,
) -> None:
    redis_server = start_redis(tmp_path / "redis")
    settings = {"REDIS_URL": redis_server.url, "REDIS_MAX_CONNECTIONS": "4"}
    admin = redis.Redis.from_url(redis_server.url)
    seed(admin, "kvstore:")
    rng = random.Random(7)  # noqa: S311 - a seeded, repeatable test schedule
    completed: list[tuple[int, int, bytes]] = []
    aborted = 0
    try:
        with running(tmp_path / "kvstore.log", settings) as service:

            async def one(number: int, patience: float) -> None:
                nonlocal aborted
                answer = await get_or_leave(
                    service.port, f"/keys/key-{number}", patience
                )
                if answer is None:
                    aborted += 1
                else:
                    completed.append((number, *answer))

            for _ in range(10):
                await asyncio.gather(
                    *(
                        one(
                            rng.randrange(KEYS),
                            rng.choice([10.0, rng.uniform(0.001, 0.05)]),
                        )
                        for _ in range(100)
                    )
                )
            checks = await asyncio.gather(
                *(
                    get_or_leave(service.port, f"/keys/key-{number}", 10.0)
                    for number in range(100)
                )
            )
            clients = admin.client_list()
    finally:
        admin.close()
        redis_server.stop()

    report(
        "client-aborts-http",
        requests=1000,
        completed=len(completed),
        aborted=aborted,
        redis_connections_after=len(clients) - 1,
    )
    assert aborted >= 100
    assert len(completed) >= 100
    for number, status, body in completed:
        assert status == 200
        assert orjson.loads(body) == {f"key-{number}": f"value-{number}"}
    for number, answer in enumerate(checks):
        assert answer is not None
        assert answer[0] == 200
        assert orjson.loads(answer[1]) == {f"key-{number}": f"value-{number}"}
    # The service's connections (the admin's own is the one more) are idle.
    assert len(clients) - 1 <= 4


async def get_or_leave(
    port: int, target: str, patience: float
) -> tuple[int, bytes] | None:
    """GET ``target`` on a new connection; hang up after ``patience`` seconds.

    Returns the status and body of a complete response, or None when the
    client hung up first. The connection is closed either way.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"GET {target} HTTP/1.1\r\nHost: kvstore\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        try:
            async with asyncio.timeout(patience):
                await writer.drain()
                data = await reader.read()
        except TimeoutError:
            return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target=target, headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(data)
    parser.receive_data(b"")
    status, body = 0, b""
    while (event := parser.next_event()) is not h11.NEED_DATA:
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        elif isinstance(event, h11.ConnectionClosed):
            break
    raise AssertionError(f"incomplete response to {target}: {data[:200]!r}")
