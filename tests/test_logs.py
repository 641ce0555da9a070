"""Log lines: JSON or text on one stream, one access line per request."""

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
from quart.typing import TestClientProtocol as QuartClient

from kvstore.logs import configure_logging

JSON_HEADERS = {"Content-Type": "application/json"}
PRIVATE_VALUE = "the-value-must-never-be-logged"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Configure logging onto a buffer; restore the loggers afterwards."""
    names = (
        "kvstore",
        "quart.app",
        "quart.serving",
        "hypercorn.error",
        "hypercorn.access",
    )
    saved = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level)
        for name in names
    }
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)
    yield stream
    for name, (handlers, level) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_request_writes_one_json_access_line(
    client: QuartClient, log_stream: io.StringIO
) -> None:
    await client.put(
        "/keys/secret-key", data=orjson.dumps(PRIVATE_VALUE), headers=JSON_HEADERS
    )
    await client.get("/keys/secret-key", headers={"X-Request-ID": "req-1"})
    await client.get("/keys/missing")

    access = [
        line for line in json_lines(log_stream) if line["logger"] == "kvstore.access"
    ]

    assert [(line["method"], line["route"], line["status"]) for line in access] == [
        ("PUT", "/keys/{id}", 201),
        ("GET", "/keys/{id}", 200),
        ("GET", "/keys/{id}", 404),
    ]
    assert access[1]["request_id"] == "req-1"
    assert all(isinstance(line["duration_ms"], float) for line in access)
    assert all({"time", "level", "message"} <= set(line) for line in access)
    assert PRIVATE_VALUE not in log_stream.getvalue()
    assert "secret-key" not in log_stream.getvalue()


async def test_unmatched_paths_are_logged_as_other(
    client: QuartClient, log_stream: io.StringIO
) -> None:
    await client.get("/no/such/path/12345")

    access = [
        line for line in json_lines(log_stream) if line["logger"] == "kvstore.access"
    ]

    assert access[0]["route"] == "other"
    assert "12345" not in log_stream.getvalue()


async def test_text_format_is_one_readable_line() -> None:
    stream = io.StringIO()
    configure_logging("text", "INFO", stream)
    try:
        logging.getLogger("kvstore.test").info("hello %s", "world", extra={"n": 1})
    finally:
        configure_logging("json", "INFO")

    line = stream.getvalue().strip()

    assert "INFO" in line
    assert "kvstore.test: hello world [n=1]" in line
    assert "\n" not in line


async def test_log_level_filters_lines() -> None:
    stream = io.StringIO()
    configure_logging("json", "WARNING", stream)
    try:
        logging.getLogger("kvstore.test").info("quiet")
        logging.getLogger("kvstore.test").warning("loud")
    finally:
        configure_logging("json", "INFO")

    messages = [
        orjson.loads(line)["message"] for line in stream.getvalue().splitlines()
    ]

    assert messages == ["loud"]


async def test_unexpected_errors_are_logged_with_traceback_and_answer_bare_500(
    client: QuartClient, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("kvstore.api._query", explode)

    response = await client.get("/keys")

    body = await response.get_json()
    errors = [line for line in json_lines(log_stream) if line["level"] == "error"]
    assert response.status_code == 500
    assert body["detail"] == "an unexpected error occurred"
    assert "boom" not in str(body)
    assert "RuntimeError: boom" in str(errors[0]["exception"])


async def test_access_lines_can_be_turned_off(client: QuartClient) -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream, access=False)
    try:
        await client.get("/healthz")
    finally:
        configure_logging("json", "INFO")

    assert "kvstore.access" not in stream.getvalue()


async def test_text_access_line_has_the_same_fields(client: QuartClient) -> None:
    stream = io.StringIO()
    configure_logging("text", "INFO", stream)
    try:
        await client.get("/healthz", headers={"X-Request-ID": "text-1"})
    finally:
        configure_logging("json", "INFO")

    line = stream.getvalue().strip()

    assert "kvstore.access: GET /healthz 200" in line
    assert "request_id=text-1" in line
    assert "duration_ms=" in line
