"""Real processes for the fault and hostile-input tests.

``Service`` runs ``python -m kvstore serve`` as a child process on a free port
with the settings a test gives it; ``start_redis`` starts a private
``redis-server`` on a free TCP port. Tests that stop, pause or restart Redis
use their own server, never the session one other tests share.
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from kvstore.embedded import EmbeddedRedis, free_port

JSON_HEADERS = {"Content-Type": "application/json"}

# Appended to by ``report`` when set: figures the README quotes.
FIGURES_VARIABLE = "KVSTORE_TEST_FIGURES"


def start_redis(
    data_dir: Path, *, persist: bool = False, extra_args: tuple[str, ...] = ()
) -> EmbeddedRedis:
    """A started redis-server on 127.0.0.1 at a free port, unsupervised."""
    server = EmbeddedRedis(
        data_dir,
        port=free_port(),
        persist=persist,
        supervise=False,
        extra_args=extra_args,
    )
    server.start()
    return server


class Service:
    """One ``kvstore serve`` child process and its log file.

    ``settings`` are ``KVSTORE_*`` variables without the prefix, as in
    ``{"REDIS_TIMEOUT": "1"}``; every other ``KVSTORE_*`` variable of the
    test's environment is left out, so the service sees only these.
    """

    def __init__(self, log_path: Path, settings: Mapping[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.environ = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("KVSTORE_")
        }
        self.environ.update(
            {f"KVSTORE_{name}": value for name, value in settings.items()}
        )
        self.environ["KVSTORE_BIND"] = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> str:
        """Start the process and return its URL once ``/healthz`` answers."""
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvstore", "serve"],
                env=self.environ,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"kvstore exited with {self.process.returncode}: {self.log_text()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kvstore did not answer within {timeout} s")

    def signal(self, number: signal.Signals) -> None:
        """Send a signal to the process."""
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process with SIGTERM, or SIGKILL if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote so far."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


@contextlib.contextmanager
def running(log_path: Path, settings: Mapping[str, str]) -> Iterator[Service]:
    """A started ``Service``, stopped when the block ends."""
    service = Service(log_path, settings)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def raw_exchange(
    port: int, request: bytes, timeout: float = 15.0, pause: float = 0.0
) -> bytes:
    """Send ``request`` bytes on a new connection and read until it closes.

    With ``pause``, the bytes are sent, then the connection stays silent
    for that many seconds before reading, like a client that stalls.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(request)
        if pause:
            time.sleep(pause)
        chunks: list[bytes] = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def report(scenario: str, **figures: object) -> None:
    """Record a scenario's figures, if ``KVSTORE_TEST_FIGURES`` names a file."""
    path = os.environ.get(FIGURES_VARIABLE)
    if not path:
        return
    line = json.dumps({"scenario": scenario, **figures}, default=str)
    with Path(path).open("a") as figures_file:
        figures_file.write(line + "\n")


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One request of a ``Traffic`` run and how it ended."""

    method: str
    key: str
    started: float
    elapsed: float
    status: int | None
    error: str | None = None
    content_type: str = ""
    retry_after: str | None = None
    body: bytes = b""


class Traffic:
    """A few clients that write and read back keys until stopped.

    Each client has its own connection and loops: PUT a new key, GET it back,
    pause ``interval`` seconds. Every request is kept as a ``Sample``, and
    ``acked`` maps each key whose PUT got a 2xx to its value.
    """

    def __init__(
        self, url: str, clients: int = 4, interval: float = 0.02, timeout: float = 30.0
    ) -> None:
        self.url = url
        self.clients = clients
        self.interval = interval
        self.timeout = timeout
        self.samples: list[Sample] = []
        self.acked: dict[str, int] = {}
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> "Traffic":
        self._tasks = [
            asyncio.create_task(self._run(number)) for number in range(self.clients)
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, number: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout, limits=limits
        ) as client:
            round_ = 0
            while not self._stopping.is_set():
                key = f"traffic-{number}-{round_}"
                put = await self._send(client, "PUT", key, str(round_).encode())
                if put.status in (200, 201):
                    self.acked[key] = round_
                await self._send(client, "GET", key)
                round_ += 1
                await asyncio.sleep(self.interval)

    async def _send(
        self, client: httpx.AsyncClient, method: str, key: str, body: bytes = b""
    ) -> Sample:
        started = time.monotonic()
        try:
            response = await client.request(
                method,
                f"/keys/{key}",
                content=body or None,
                headers=JSON_HEADERS if body else None,
            )
        except httpx.TransportError as exc:
            sample = Sample(
                method, key, started, time.monotonic() - started, None, repr(exc)
            )
        else:
            sample = Sample(
                method,
                key,
                started,
                time.monotonic() - started,
                response.status_code,
                content_type=response.headers.get("Content-Type", ""),
                retry_after=response.headers.get("Retry-After"),
                body=response.content,
            )
        self.samples.append(sample)
        return sample

    def first_success_after(self, moment: float) -> float | None:
        """When the first request started after ``moment`` got a 2xx."""
        return min(
            (
                sample.started + sample.elapsed
                for sample in self.samples
                if sample.started >= moment and sample.status in (200, 201)
            ),
            default=None,
        )
