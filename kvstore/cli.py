"""The command line: ``kvstore serve``.

``serve`` reads the settings, starts an embedded Redis when neither
``KVSTORE_REDIS_URL`` nor ``KVSTORE_REDIS_SENTINELS`` is set, and runs the
app on Hypercorn with uvloop.
With ``KVSTORE_WORKERS=1`` the app runs in this process; with more, Hypercorn
starts that many worker processes sharing the listening socket, and each
builds its app from the same environment.
"""

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from hypercorn.config import Config
from hypercorn.run import run as run_hypercorn
from quart import Quart

from kvstore import __version__
from kvstore.app import create_app
from kvstore.embedded import EmbeddedRedis, EmbeddedRedisError
from kvstore.logs import configure_logging
from kvstore.settings import Settings, SettingsError

log = logging.getLogger(__name__)


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
    except SettingsError as exc:
        sys.stderr.write(f"kvstore: {exc}\n")
        return 2
    configure_logging(settings.log_format, settings.log_level)
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
    log.info("kvstore starting", extra={"settings": Settings.from_env().public()})
    try:
        run_hypercorn(hypercorn_config(settings))
    finally:
        if embedded is not None:
            embedded.stop()
        log.info("kvstore stopped")
    return 0


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn's configuration for ``settings``."""
    config = Config()
    config.bind = [settings.bind]
    # Hypercorn runs the app in this process for 0 workers.
    config.workers = 0 if settings.workers == 1 else settings.workers
    config.worker_class = "uvloop"
    config.application_path = "kvstore.cli:worker_app()"
    config.graceful_timeout = settings.shutdown_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.backlog = 1024
    return config


def worker_app() -> Quart:
    """The app of one Hypercorn worker, configured from the environment."""
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)
