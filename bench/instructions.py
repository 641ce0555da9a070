"""Instructions per request, app against app: ``python -m bench.instructions``.

CPU time on a shared two-core machine drifts by more than the differences
worth finding, so this measures something that does not: the machine
instructions the Python process executes per request, counted by valgrind's
callgrind. The same count comes back run after run, whatever else the
machine is doing.

Each app is called in-process through ASGI (no HTTP server, so Hypercorn's
share, the same for both, is left out) with 64 requests in flight against a
private Redis: kvstore built the way ``kvstore serve`` builds a worker
(access log, API token, CORS, metrics, the tuned garbage collector), and the
bare Quart baseline. Each app runs twice, with 640 and with 1,920 requests;
the difference divided by 1,280 is the cost of one request, start-up and
shutdown cancelled out. Under valgrind a run takes about a minute.
"""

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.dataset import key_id
from bench.loadgen import require_program
from bench.targets import KVSTORE, QUART_BARE, loaded_redis

KEY_PREFIX = "kvstore:"
KEYS = 10_000
IN_FLIGHT = 64
SHORT_RUN = 640
LONG_RUN = 1920
TOKEN = "bench-instructions-token-0123456789"  # noqa: S105
VALUE = b'{"name":"bench","n":1}'

Message = dict[str, Any]


def build_app(target: str) -> Any:
    """The ASGI app of `target`, configured from the environment."""
    if target == KVSTORE:
        from kvstore.cli import worker_app

        return worker_app()
    from bench.baselines import quart_bare

    return quart_bare.app


def request_scope(method: str, key: str) -> Message:
    """An HTTP scope like the one Hypercorn passes for a wrk request."""
    path = f"/keys/{key}"
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"authorization", f"Bearer {TOKEN}".encode()),
    ]
    if method == "PUT":
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(VALUE)).encode()),
        ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
        "state": {},
    }


async def call(app: Any, method: str, key: str) -> int:
    """Send one request through `app`; return the response status."""
    body_sent = False
    messages: list[Message] = []

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            body = VALUE if method == "PUT" else b""
            return {"type": "http.request", "body": body, "more_body": False}
        # The client stays connected until the app stops listening.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.append(message)

    await app(request_scope(method, key), receive, send)
    return int(messages[0]["status"])


async def drive(target: str, method: str, requests: int) -> None:
    """Start `target`, serve `requests` requests, 64 at a time, and stop it."""
    app = build_app(target)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            inbox.get,
            outbox.put,
        )
    )
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"{target} did not start: {started}")

    # The same keys every run, so both runs of an app read alike.
    numbers = random.Random(1)  # noqa: S311
    statuses: list[int] = []

    async def client(count: int) -> None:
        for _ in range(count):
            key = key_id(numbers.randrange(KEYS))
            statuses.append(await call(app, method, key))

    await asyncio.gather(*(client(requests // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await lifespan
    failed = [status for status in statuses if status >= 300]
    if failed:
        raise RuntimeError(f"{target}: {len(failed)} requests failed, e.g. {failed[0]}")


def child_env(redis_url: str) -> dict[str, str]:
    """The environment both apps read their settings from."""
    env = dict(os.environ)
    env.update(
        {
            "KVSTORE_REDIS_URL": redis_url,
            "KVSTORE_KEY_PREFIX": KEY_PREFIX,
            "KVSTORE_WORKERS": "1",
            "KVSTORE_ACCESS_LOG": "true",
            "KVSTORE_LOG_FORMAT": "json",
            "KVSTORE_API_TOKENS": f"rw:{TOKEN}",
            "KVSTORE_CORS_ORIGINS": "https://app.example.com",
            # Valgrind runs the process some fifty times slower.
            "KVSTORE_REDIS_TIMEOUT": "120",
            "KVSTORE_REDIS_CONNECT_TIMEOUT": "120",
        }
    )
    return env


def count_instructions(target: str, method: str, requests: int, redis_url: str) -> int:
    """Instructions one child run executes in all, start-up included."""
    valgrind = require_program("valgrind")
    argv = [
        valgrind,
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.instructions",
        "--child",
        target,
        method,
        str(requests),
    ]
    completed = subprocess.run(  # noqa: S603
        argv,
        env=child_env(redis_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=1800,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", completed.stderr)
    if completed.returncode != 0 or found is None:
        raise RuntimeError(f"{target} {method} failed:\n{completed.stderr[-3000:]}")
    return int(found.group(1))


def per_request(target: str, method: str, redis_url: str) -> int:
    """Instructions per request: the long run less the short one, per request."""
    short = count_instructions(target, method, SHORT_RUN, redis_url)
    long = count_instructions(target, method, LONG_RUN, redis_url)
    return round((long - short) / (LONG_RUN - SHORT_RUN))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="GET,PUT", help="GET, PUT or both")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        target, method, requests = args.child
        asyncio.run(drive(target, method, int(requests)))
        return 0

    methods = [m.strip().upper() for m in args.methods.split(",") if m.strip()]
    with (
        tempfile.TemporaryDirectory() as scratch,
        loaded_redis(Path(scratch), KEY_PREFIX, KEYS) as redis,
    ):
        rows = []
        for method in methods:
            kvstore = per_request(KVSTORE, method, redis.url)
            bare = per_request(QUART_BARE, method, redis.url)
            rows.append((method, kvstore, bare))

    lines = [
        "| request | kvstore | quart-bare | kvstore / quart-bare |",
        "|---|---|---|---|",
    ]
    for method, kvstore, bare in rows:
        ratio = kvstore / bare
        lines.append(
            f"| {method} /keys/{{id}} | {kvstore:,} | {bare:,} | {ratio:.2f}x |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
