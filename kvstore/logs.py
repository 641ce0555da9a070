"""Logging: one line per event on stdout, as JSON or as plain text.

``configure_logging`` runs once, before the app is created, and owns the
root of the ``kvstore`` logger tree (Quart's and Hypercorn's loggers are
routed through the same handler). The request id of the request being
served lives in a context variable, so every line logged while serving a
request carries it without passing it around.

Lines never carry stored values or secrets: access lines have the method,
the route template (``/keys/{id}``, never the key), the status, the duration
and the request id.
"""

import contextvars
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kvstore_request_id", default=None
)

access_log = logging.getLogger("kvstore.access")

# Attributes every LogRecord has; anything else on a record came in through
# ``extra=`` and belongs in the JSON line.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """Format a record for people: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one readable line (plus a traceback if any)."""
        extras = " ".join(
            f"{name}={value}"
            for name, value in vars(record).items()
            if name not in _RECORD_ATTRIBUTES
        )
        request_id = request_id_var.get()
        if request_id is not None:
            extras = f"request_id={request_id} {extras}".rstrip()
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} "
            f"{record.name}: {record.getMessage()}"
        )
        if extras:
            line = f"{line} [{extras}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(
    log_format: str = "json",
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    access: bool = True,
) -> None:
    """Send kvstore's, Quart's and the server's logs to ``stream`` (stdout).

    The servers' own access logs stay off: kvstore writes one access line per
    request itself, or none with ``access=False``. Calling this again replaces
    the earlier configuration.
    """
    global _access_writer
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    for name in (
        "kvstore",
        "quart.app",
        "quart.serving",
        "hypercorn.error",
        "uvicorn.error",
    ):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    for name in ("hypercorn.access", "uvicorn.access"):
        server_access = logging.getLogger(name)
        server_access.handlers[:] = [logging.NullHandler()]
        server_access.propagate = False
    # Thread and process names cost a lookup on every record and say nothing
    # here: one event loop thread per process, and the pid is in the logs of
    # whatever runs the service.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    enabled = access and access_log.isEnabledFor(logging.INFO)
    _access_writer = AccessWriter(handler, log_format) if enabled else None


class AccessWriter:
    """Writes access lines straight to the log stream.

    An access line is written for every request, so it skips the general
    machinery of ``logging`` (a LogRecord, caller lookup, extras scan) and
    renders the same fields the formatters would, under the handler's lock.
    """

    def __init__(self, handler: "logging.StreamHandler[TextIO]", log_format: str):
        self._handler = handler
        self._json = log_format == "json"

    def write(self, method: str, route: str, status: int, duration_ms: float) -> None:
        """Write one access line."""
        now = time.time()
        request_id = request_id_var.get()
        message = f"{method} {route} {status}"
        if self._json:
            line = orjson.dumps(
                {
                    "time": _timestamp(now),
                    "level": "info",
                    "logger": access_log.name,
                    "message": message,
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                }
            ).decode()
        else:
            line = (
                f"{_timestamp(now)} INFO    {access_log.name}: {message} "
                f"[request_id={request_id} method={method} route={route} "
                f"status={status} duration_ms={duration_ms}]"
            )
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(line + "\n")
            handler.stream.flush()
        finally:
            handler.release()


_access_writer: AccessWriter | None = None


def log_access(method: str, route: str, status: int, started: float) -> None:
    """Write the access line of one request; ``started`` is a perf_counter().

    The request id comes from the logging context, like every other line.
    """
    if _access_writer is not None:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        _access_writer.write(method, route, status, duration_ms)


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
