"""The command line: ``kvstore serve``.

``serve`` reads the settings, starts an embedded Redis when neither
``KVSTORE_REDIS_URL`` nor ``KVSTORE_REDIS_SENTINELS`` is set, and runs the app
with uvloop on Hypercorn, or on uvicorn (with httptools) when
``KVSTORE_SERVER=uvicorn``. With ``KVSTORE_WORKERS=1`` the app runs in this
process; with more, the server starts that many worker processes sharing the
listening socket, and each builds its app from the same environment. Both
servers get the same bind address, workers, logging, request limits and
graceful shutdown. Workers exchange their metrics through
``KVSTORE_METRICS_DIR``, a private temporary directory unless set.
"""

import argparse
import gc
import importlib.util
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from hypercorn.config import Config
from hypercorn.run import run as run_hypercorn
from quart import Quart

from kvstore import __version__
from kvstore.app import create_app
from kvstore.auth import load_tokens
from kvstore.embedded import EmbeddedRedis, EmbeddedRedisError
from kvstore.logs import configure_logging
from kvstore.metrics import clear_exchange_dir
from kvstore.settings import Settings, SettingsError
from kvstore.store import connection_options

log = logging.getLogger(__name__)

# The factory each server (and each worker process) imports the app from.
APPLICATION = "kvstore.cli:worker_app"
# Connections the kernel may hold for the workers to accept. A burst larger
# than this (a thousand clients connecting at once) has its excess SYNs
# dropped and retried a second later. Linux caps it at net.core.somaxconn.
BACKLOG = 4096
# Seconds an idle connection, or one still sending its request head, is kept.
KEEP_ALIVE_TIMEOUT = 5.0
# What the server may buffer of a request head beyond KVSTORE_MAX_HEADER_BYTES:
# the request line and the line ends, which the app does not count.
HEAD_SLACK_BYTES = 1024
# Allocations between young-generation garbage collections (CPython's
# default is 700). Each request allocates a few hundred objects that live
# until its response is sent, so with dozens of requests in flight the
# default collects every few requests and scans them all each time.
GC_YOUNG_THRESHOLD = 7000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="kvstore", description="A key-value HTTP service for JSON values."
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API (settings: KVSTORE_*)")
    parser.parse_args(argv)
    # "serve" is the only command; argparse has refused anything else.
    return serve()


def serve() -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    try:
        settings = Settings.from_env()
        # Read the token and password files and load the TLS files once here,
        # so a mistake in them stops the start with one clear line.
        load_tokens(settings)
        connection_options(settings)
    except SettingsError as exc:
        sys.stderr.write(f"kvstore: {exc}\n")
        return 2
    configure_logging(
        settings.log_format, settings.log_level, access=settings.access_log
    )
    if settings.server == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        sys.stderr.write(
            "kvstore: KVSTORE_SERVER=uvicorn needs uvicorn: "
            "pip install 'kvstore[uvicorn]'\n"
        )
        return 2
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None and settings.redis_sentinels is None:
        try:
            embedded = EmbeddedRedis(settings.data_dir)
            url = embedded.start()
        except EmbeddedRedisError as exc:
            sys.stderr.write(f"kvstore: {exc}\n")
            return 1
        log.warning(
            "no KVSTORE_REDIS_URL: serving from an embedded Redis, for local use only",
            extra={"data_dir": str(embedded.data_dir)},
        )
        # Worker processes read their settings from the environment.
        os.environ["KVSTORE_REDIS_URL"] = url
    own_metrics_dir: Path | None = None
    if settings.metrics_dir is not None:
        clear_exchange_dir(settings.metrics_dir)
    elif settings.workers > 1:
        # Workers hand their metrics to each other through this directory.
        own_metrics_dir = Path(tempfile.mkdtemp(prefix="kvstore-metrics-"))
        os.environ["KVSTORE_METRICS_DIR"] = str(own_metrics_dir)
    log.info("kvstore starting", extra={"settings": Settings.from_env().public()})
    try:
        if settings.server == "uvicorn":
            run_uvicorn(settings)
        else:
            run_hypercorn(hypercorn_config(settings))
    finally:
        if embedded is not None:
            embedded.stop()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
        log.info("kvstore stopped")
    return 0


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn's configuration for ``settings``."""
    config = Config()
    config.bind = [settings.bind]
    if settings.metrics_bind is not None:
        config.bind.append(settings.metrics_bind)
    # Hypercorn runs the app in this process for 0 workers.
    config.workers = 0 if settings.workers == 1 else settings.workers
    config.worker_class = "uvloop"
    config.application_path = f"{APPLICATION}()"
    config.graceful_timeout = settings.shutdown_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.backlog = BACKLOG
    # Hypercorn drops a connection that sends no complete request head within
    # this many seconds of going idle, so a client dribbling its headers
    # cannot hold a connection open; slow bodies meet KVSTORE_BODY_TIMEOUT.
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # A head Hypercorn must buffer past this is refused with 431; the app
    # checks complete heads against KVSTORE_MAX_HEADER_BYTES exactly.
    config.h11_max_incomplete_size = settings.max_header_bytes + HEAD_SLACK_BYTES
    config.h2_max_header_list_size = settings.max_header_bytes + HEAD_SLACK_BYTES
    return config


def run_uvicorn(settings: Settings) -> None:
    """Serve with uvicorn until SIGINT or SIGTERM."""
    host, _, port = settings.bind.rpartition(":")
    address: dict[str, Any] = (
        {"uds": settings.bind.removeprefix("unix:")}
        if settings.bind.startswith("unix:")
        else {"host": host.strip("[]"), "port": int(port)}
    )
    # uvicorn re-raises the signal that stopped it once it has shut down, to
    # end the process the way the signal would have. kvstore still has work
    # to do then (stopping the embedded Redis), so the re-raised signal lands
    # on a handler that lets the call return instead.
    previous = {
        number: signal.signal(number, _ignore_signal)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        _run_uvicorn(settings, address)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _ignore_signal(number: int, frame: FrameType | None) -> None:
    log.debug("signal %s received after shutdown", number)


def _run_uvicorn(settings: Settings, address: dict[str, Any]) -> None:
    import uvicorn

    from kvstore.uvicorn_http import TimedHeadProtocol

    uvicorn.run(
        APPLICATION,
        factory=True,
        **address,
        workers=settings.workers,
        loop="uvloop",
        # httptools, with a time limit on request heads that uvicorn lacks.
        http=TimedHeadProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        timeout_keep_alive=math.ceil(KEEP_ALIVE_TIMEOUT),
        h11_max_incomplete_event_size=settings.max_header_bytes + HEAD_SLACK_BYTES,
    )


def worker_app() -> Quart:
    """The app of one server worker, configured from the environment.

    Young garbage collections run a tenth as often as CPython's default once
    the app is built, which took collection from about 70 to 20
    microseconds of CPU per request with 64 requests in flight. (Freezing
    the start-up objects with ``gc.freeze`` saved no more, and one worker in
    a few then skipped its shutdown hooks.)
    """
    settings = Settings.from_env()
    configure_logging(
        settings.log_format, settings.log_level, access=settings.access_log
    )
    app = create_app(settings)
    tune_garbage_collection()
    return app


def tune_garbage_collection() -> None:
    """Make young collections rarer; the older generations keep their ratios."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
