"""A small closed-loop HTTP/1.1 load driver, for the requests wrk cannot make.

wrk parses every response as if it had a body, so a HEAD response that
carries the Content-Length of the matching GET (as HTTP says it should)
stalls the connection. This driver knows which requests were HEAD. It keeps
`connections` keep-alive connections busy for `duration` seconds, one request
in flight on each, and prints the same ``BENCH_RESULT {...}`` line as the
wrk scripts, so `bench.loadgen` reads both alike.

It runs in its own process on uvloop with prebuilt requests and minimal
parsing; at the request rates of the services here it costs about as much
CPU as wrk does.

Run it with ``python -m bench.httpload --url http://127.0.0.1:5000 --method
HEAD --keys 10000 --connections 64 --duration 10``.
"""

import argparse
import asyncio
import functools
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import uvloop

from bench.dataset import key_id, value_json

RESULT_MARKER = "BENCH_RESULT "
HEADER_END = b"\r\n\r\n"
RECONNECT_PAUSE = 0.01


class ResponseError(Exception):
    """The server sent something this driver cannot parse."""


@dataclass
class Tally:
    """Counters shared by all connections of one run."""

    timeout: float
    latencies: list[float] = field(default_factory=list)
    completed: int = 0
    sent: int = 0
    status_errors: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    timeouts: int = 0
    received_bytes: int = 0

    def record(self, status: int, latency: float) -> None:
        """Count one complete response."""
        self.completed += 1
        if status >= 400:
            self.status_errors += 1
        if latency > self.timeout:
            self.timeouts += 1
        else:
            self.latencies.append(latency)


def parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """Return status, Content-Length (None if absent) and whether it closes."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ResponseError(f"bad status line: {lines[0]!r}")
    status = int(parts[1])
    length: int | None = None
    closes = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ResponseError("chunked responses are not supported")
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
    return status, length, closes


class Driver:
    """Runs the connections of one load run."""

    def __init__(
        self,
        host: str,
        port: int,
        requests: Sequence[bytes],
        head_only: bool,
        tally: Tally,
        max_requests: int,
    ) -> None:
        self.host = host
        self.port = port
        self.requests = requests
        self.head_only = head_only
        self.tally = tally
        self.max_requests = max_requests
        self.stopping = False
        self.stopped = asyncio.Event()
        # A fixed seed gives every target the same request sequence; this
        # picks load, not secrets.
        self._random = random.Random(1)  # noqa: S311

    def next_request(self) -> bytes | None:
        """Return the next request to send, or None once the run is over."""
        if self.stopping:
            return None
        self.tally.sent += 1
        if self.max_requests and self.tally.sent >= self.max_requests:
            self.stop()
        return self._random.choice(self.requests)

    def stop(self) -> None:
        """End the run: no request is sent after this."""
        self.stopping = True
        self.stopped.set()

    async def keep_connected(self) -> None:
        """Keep one connection open and busy until the run stops."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            closed = loop.create_future()
            try:
                await loop.create_connection(
                    functools.partial(_Connection, self, closed), self.host, self.port
                )
            except OSError:
                self.tally.connect_errors += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            await closed


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, driver: Driver, closed: "asyncio.Future[None]") -> None:
        self._driver = driver
        self._closed = closed
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._started = 0.0
        self._waiting = False
        self._body_left: int | None = None
        self._status = 0
        self._closes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Stream connections get a Transport; uvloop's is not a subclass.
        self._transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        request = self._driver.next_request()
        if request is None or self._transport is None:
            self._close()
            return
        self._started = time.perf_counter()
        self._waiting = True
        self._transport.write(request)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._driver.tally.received_bytes += len(data)
        self._buffer += data
        try:
            self._consume()
        except (ResponseError, ValueError):
            self._driver.tally.read_errors += 1
            self._waiting = False
            self._close()

    def _consume(self) -> None:
        while True:
            if self._body_left is None:
                end = self._buffer.find(HEADER_END)
                if end < 0:
                    return
                head = bytes(self._buffer[:end])
                del self._buffer[: end + len(HEADER_END)]
                self._status, length, self._closes = parse_head(head)
                # A HEAD response's Content-Length describes the GET body
                # that was not sent.
                self._body_left = 0 if self._driver.head_only else (length or 0)
            if len(self._buffer) < self._body_left:
                return
            del self._buffer[: self._body_left]
            self._body_left = None
            self._complete()
            if self._closes or not self._waiting:
                return

    def _complete(self) -> None:
        latency = time.perf_counter() - self._started
        self._waiting = False
        self._driver.tally.record(self._status, latency)
        if self._closes:
            self._close()
        else:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting and not self._driver.stopping:
            self._driver.tally.read_errors += 1
        if not self._closed.done():
            self._closed.set_result(None)


def build_requests(
    host: str, method: str, keys: int, token: str | None = None
) -> list[bytes]:
    """One prebuilt request per preloaded key, with a bearer token if given."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    requests: list[bytes] = []
    for number in range(keys):
        line = f"{method} /keys/{key_id(number)} HTTP/1.1\r\nHost: {host}\r\n{auth}"
        if method == "PUT":
            body = value_json(number + 1).encode()
            head = (
                f"{line}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            requests.append(head.encode() + body)
        else:
            requests.append(f"{line}\r\n".encode())
    return requests


def percentile(ordered: Sequence[float], share: float) -> float:
    """The nearest-rank percentile `share` (0-100) of sorted values."""
    if not ordered:
        return 0.0
    # Rounding first keeps 99.9% of 1000 at rank 999, not 1000.
    rank = max(1, math.ceil(round(share / 100 * len(ordered), 9)))
    return ordered[rank - 1]


def result_line(tally: Tally, duration: float, capped: bool) -> str:
    """Format the figures as the wrk scripts' done() hook does."""
    ordered = sorted(tally.latencies)
    micros = [value * 1e6 for value in ordered]
    mean = sum(micros) / len(micros) if micros else 0.0
    variance = sum((v - mean) ** 2 for v in micros) / len(micros) if micros else 0.0
    result = {
        "requests": tally.completed,
        "duration_us": round(duration * 1e6),
        "bytes": tally.received_bytes,
        "sent": tally.sent,
        "capped": capped,
        "errors": {
            "connect": tally.connect_errors,
            "read": tally.read_errors,
            # A failed write surfaces as a lost connection: a read error.
            "write": 0,
            "status": tally.status_errors,
            "timeout": tally.timeouts,
        },
        "latency_us": {
            "mean": round(mean, 1),
            "stdev": round(math.sqrt(variance), 1),
            "max": round(micros[-1]) if micros else 0,
            "p50": round(percentile(micros, 50)),
            "p90": round(percentile(micros, 90)),
            "p99": round(percentile(micros, 99)),
            "p999": round(percentile(micros, 99.9)),
        },
    }
    return RESULT_MARKER + json.dumps(result, separators=(",", ":"))


async def run(args: argparse.Namespace) -> str:
    """Drive the target for the configured time; return the result line."""
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    method = args.method.upper()
    requests = build_requests(f"{host}:{port}", method, args.keys, args.token)
    tally = Tally(timeout=args.timeout)
    driver = Driver(host, port, requests, method == "HEAD", tally, args.max_requests)

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(driver.keep_connected()) for _ in range(args.connections)
    ]
    try:
        await asyncio.wait_for(driver.stopped.wait(), timeout=args.duration)
    except TimeoutError:
        driver.stop()
    duration = time.perf_counter() - started
    capped = bool(args.max_requests) and tally.sent >= args.max_requests
    # Responses still in flight are not counted, as in wrk.
    line = result_line(tally, duration, capped)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one result line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the target")
    parser.add_argument("--method", default="HEAD", choices=("HEAD", "GET", "PUT"))
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--token", help="bearer token sent with every request")
    args = parser.parse_args(argv)

    line = uvloop.run(run(args))
    sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
