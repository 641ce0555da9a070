"""Helpers shared by test modules."""

import asyncio
import subprocess
import time
from typing import Any, cast

import httpx
import pytest
from quart import Quart

from kvstore.embedded import find_redis_server


def wait_until_healthy(
    url: str, process: "subprocess.Popen[bytes]", timeout: float = 20.0
) -> None:
    """Return once ``url`` answers ``/healthz``; fail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"kvstore exited with {process.returncode} before serving")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"kvstore did not answer on {url} within {timeout} s")


async def asgi_request(
    app: Quart, method: str, path: str, messages: list[dict[str, Any]] | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Call the app as a server would; the test client rewrites HEAD lengths.

    ``messages`` collects what the app sent, for tests where it raises.
    """
    if messages is None:
        messages = []
    inbox = [{"type": "http.request", "body": b"", "more_body": False}]
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            finished.set()

    scope = {
        "type": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 5000),
        "extensions": {},
    }
    await cast(Any, app)(scope, receive, send)
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], dict(start["headers"]), body


def has_redis_7() -> bool:
    """Whether the redis-server the tests would use is Redis 7 or newer."""
    binary = find_redis_server()
    if binary is None:
        return False
    result = subprocess.run(
        [binary, "--version"], capture_output=True, timeout=10, check=False
    )
    version = result.stdout.decode().partition("v=")[2].split(".")[0]
    return version.isdigit() and int(version) >= 7


def need_redis_7() -> None:
    """Skip the test unless the redis-server in use is Redis 7 or newer."""
    if not has_redis_7():
        pytest.skip(
            "needs Redis 7's redis-server (DEBUG commands, clusters): "
            "Debian: apt-get install redis-server"
        )
