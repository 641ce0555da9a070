"""The servers the benchmark starts: Redis, the delay proxy and the HTTP targets.

HTTP targets:

- ``kvstore``: the real service, ``python -m kvstore serve``, with access logs
  on (to a file) and everything else at its defaults;
- ``quart-bare``: ``bench/baselines/quart_bare.py`` on Hypercorn with uvloop,
  the ceiling of the stack;
- ``flask``: ``bench/baselines/flask_sync.py`` on gunicorn sync workers, the
  conventional baseline.

Every target gets the same worker count, Redis URL and key prefix, and logs
to its own file under the run's log directory.
"""

import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from bench.dataset import Dataset
from bench.delay_proxy import REFUSAL_MESSAGE
from bench.procs import (
    LOOPBACK,
    Child,
    find_free_port,
    wait_for_http,
    wait_for_port,
)

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BASELINES_DIR = BENCH_DIR / "baselines"

KVSTORE = "kvstore"
QUART_BARE = "quart-bare"
FLASK = "flask"
HTTP_TARGETS = (KVSTORE, QUART_BARE, FLASK)
MANAGED_VARIABLES = frozenset(
    {
        "KVSTORE_BIND",
        "KVSTORE_WORKERS",
        "KVSTORE_REDIS_URL",
        "KVSTORE_KEY_PREFIX",
        "KVSTORE_API_TOKENS",
    }
)
# An origin for kvstore's CORS support; no request of the suite sends it.
CORS_ORIGIN = "https://app.example.com"


def new_api_token() -> str:
    """A random token in the form kvstore accepts (URL-safe base64)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class ServerSettings:
    """What every HTTP target is started with."""

    redis_url: str
    key_prefix: str
    workers: int
    backlog: int
    log_dir: Path
    # More KVSTORE_* settings for kvstore alone, such as another server.
    kvstore_env: tuple[tuple[str, str], ...] = ()
    # kvstore's API token (role rw); clients send it to every target alike.
    api_token: str | None = None


def parse_kvstore_env(text: str) -> tuple[str, str]:
    """Read a ``KVSTORE_NAME=value`` command-line argument.

    Raises ValueError for anything else, since kvstore reads only its own
    variables and the suite sets the connection ones itself.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("KVSTORE_"):
        raise ValueError(f"expected KVSTORE_NAME=value, got {text!r}")
    if name in MANAGED_VARIABLES:
        raise ValueError(f"{name} is set by the benchmark itself")
    return name, value


@dataclass
class HttpServer:
    """A started HTTP target."""

    name: str
    port: int
    child: Child

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"


def locate_kvstore(cwd: Path) -> str | None:
    """Return where the installed kvstore package lives, or None if it is absent.

    Asked in a child started in `cwd`, where the targets run too: ``-m`` puts
    the working directory first on sys.path, and a checkout's own ``kvstore``
    folder could otherwise shadow the installed package.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, "-c", "import kvstore.cli; print(kvstore.cli.__file__)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        return None
    return str(Path(completed.stdout.strip()).parent)


def _base_env(settings: ServerSettings) -> dict[str, str]:
    env = dict(os.environ)
    env["KVSTORE_REDIS_URL"] = settings.redis_url
    env["KVSTORE_KEY_PREFIX"] = settings.key_prefix
    # Output goes to a file; unbuffered keeps the log whole if a server dies.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def server_command(
    name: str, port: int, settings: ServerSettings
) -> tuple[list[str], dict[str, str]]:
    """Return the argv and environment that start target `name` on `port`."""
    env = _base_env(settings)
    bind = f"{LOOPBACK}:{port}"
    if name == KVSTORE:
        env["KVSTORE_BIND"] = bind
        env["KVSTORE_WORKERS"] = str(settings.workers)
        env["KVSTORE_LOG_FORMAT"] = "json"
        # Measure the service as deployed: access log, API tokens and CORS
        # on (metrics are always on).
        env["KVSTORE_ACCESS_LOG"] = "true"
        if settings.api_token is not None:
            env["KVSTORE_API_TOKENS"] = f"rw:{settings.api_token}"
        env["KVSTORE_CORS_ORIGINS"] = CORS_ORIGIN
        env.update(settings.kvstore_env)
        return [sys.executable, "-m", "kvstore", "serve"], env
    if name == QUART_BARE:
        argv = [
            sys.executable,
            "-m",
            "hypercorn",
            "--workers",
            str(settings.workers),
            "--worker-class",
            "uvloop",
            "--bind",
            bind,
            "--backlog",
            str(settings.backlog),
            f"{BASELINES_DIR / 'quart_bare.py'}:app",
        ]
        return argv, env
    if name == FLASK:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(settings.workers),
            "--worker-class",
            "sync",
            "--bind",
            bind,
            "--backlog",
            str(settings.backlog),
            # A sync worker busy longer than this is killed; bulk reads of a
            # million keys take seconds.
            "--timeout",
            "600",
            "--chdir",
            str(BASELINES_DIR),
            "flask_sync:app",
        ]
        return argv, env
    raise ValueError(f"unknown HTTP target: {name}")


def start_server(name: str, settings: ServerSettings, label: str) -> HttpServer:
    """Start target `name` and wait until it answers HTTP."""
    port = find_free_port()
    argv, env = server_command(name, port, settings)
    child = Child(
        name,
        argv,
        log_path=settings.log_dir / f"{name}-{label}.log",
        env=env,
        # Not the checkout: see locate_kvstore.
        cwd=settings.log_dir,
    )
    child.start()
    try:
        probe = "/healthz" if name == KVSTORE else "/keys/readiness-probe"
        wait_for_http(child, port, probe)
    except BaseException:
        child.stop()
        raise
    log.info("%s (%s) is up on port %d, pid %d", name, label, port, child.pid)
    return HttpServer(name, port, child)


class RedisServer:
    """A private redis-server on a free port, without persistence."""

    def __init__(self, log_dir: Path) -> None:
        self.port = find_free_port()
        self._dir = log_dir / "redis"
        self.child = Child(
            "redis-server",
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                # Enough clients for a thousand HTTP connections' worth of
                # pools; the descriptors come from the raised RLIMIT_NOFILE.
                "--maxclients",
                "10000",
            ],
            log_path=log_dir / "redis-server.log",
        )

    @property
    def url(self) -> str:
        """The redis:// URL of database 0."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self.child.start()
        wait_for_port(self.child, self.port)
        client = self.client()
        try:
            client.ping()
        finally:
            client.close()
        log.info("redis-server is up on port %d, pid %d", self.port, self.child.pid)

    def client(self) -> Redis:
        """Return a new synchronous client (bytes responses)."""
        return Redis(host=LOOPBACK, port=self.port, socket_timeout=600)

    def stop(self) -> None:
        """Stop the server; its data is discarded."""
        self.child.stop()


@contextmanager
def loaded_redis(log_dir: Path, key_prefix: str, keys: int) -> Iterator[RedisServer]:
    """A private Redis holding `keys` preloaded keys, stopped after the block."""
    redis = RedisServer(log_dir)
    redis.start()
    try:
        client = redis.client()
        try:
            Dataset(client, key_prefix).ensure(keys)
        finally:
            client.close()
        yield redis
    finally:
        redis.stop()


class DelayProxyServer:
    """``bench/delay_proxy.py`` in front of a Redis server."""

    def __init__(self, upstream_port: int, delay_ms: float, log_dir: Path) -> None:
        self.port = find_free_port()
        self.delay_ms = delay_ms
        self.child = Child(
            "delay-proxy",
            [
                sys.executable,
                "-m",
                "bench.delay_proxy",
                "--listen-port",
                str(self.port),
                "--upstream-port",
                str(upstream_port),
                "--delay-ms",
                str(delay_ms),
            ],
            log_path=log_dir / "delay-proxy.log",
            cwd=REPO_DIR,
        )

    @property
    def url(self) -> str:
        """The redis:// URL that reaches Redis through the proxy."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start the proxy and wait until it listens."""
        self.child.start()
        wait_for_port(self.child, self.port)

    def stop(self) -> None:
        """Stop the proxy, closing every proxied connection."""
        self.child.stop()

    def refusals(self) -> int:
        """How many connections the proxy has refused so far."""
        try:
            text = self.child.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count(REFUSAL_MESSAGE)
