"""Errors as ``application/problem+json`` responses (RFC 9457).

``ProblemError`` and its subclasses are raised by the HTTP layer for bad
requests; store errors and werkzeug's HTTP exceptions are mapped here by
class, so every error body has the same shape: ``type``, ``title``,
``status`` and ``detail``. Anything unexpected is logged once with its
traceback and answered with a bare 500 problem that reveals nothing.
"""

import logging
from typing import Any, ClassVar

import orjson
from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from kvstore.store import StoreError, StoreTimeoutError, StoreUnavailableError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """A client-side problem, answered with ``status`` and this message."""

    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad Request"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequestError(ProblemError):
    """Malformed JSON, a bad key, filter or ``expire_in``, an empty body."""


class UnauthorizedError(ProblemError):
    """No valid bearer token; ``headers`` carry the ``WWW-Authenticate`` challenge."""

    status = 401
    title = "Unauthorized"


class ForbiddenError(ProblemError):
    """A valid token whose role does not allow the request (a read-only write)."""

    status = 403
    title = "Forbidden"


class NotFoundError(ProblemError):
    """The key does not exist (or has expired)."""

    status = 404
    title = "Not Found"


class TooLargeError(ProblemError):
    """A body, a value or a number of pairs over its limit."""

    status = 413
    title = "Content Too Large"


class UnsupportedMediaTypeError(ProblemError):
    """A body sent without a JSON content type."""

    status = 415
    title = "Unsupported Media Type"


def problem_body(status: int, title: str, detail: str) -> bytes:
    """The JSON body of a problem, for code that answers below Quart."""
    return orjson.dumps(
        {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
        }
    )


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    """Build a problem+json response."""
    body = problem_body(status, title, detail)
    response = Response(body, status=status, content_type=PROBLEM_JSON)
    if headers:
        response.headers.update(headers)
    return response


def register_error_handlers(app: Quart, retry_after: int) -> None:
    """Answer every error raised while handling a request with a problem."""

    @app.errorhandler(ProblemError)
    async def handle_problem(error: ProblemError) -> Response:
        return problem(error.status, error.title, error.detail, error.headers)

    @app.errorhandler(HTTPException)
    async def handle_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        headers = {
            name: value
            for name, value in error.get_headers()
            if name.lower() not in ("content-type", "content-length")
        }
        detail = _HTTP_DETAILS.get(status, error.description or error.name)
        return problem(status, error.name, detail, headers)

    @app.errorhandler(StoreError)
    async def handle_store_error(error: StoreError) -> Response:
        if isinstance(error, StoreUnavailableError | StoreTimeoutError):
            log.warning("store unavailable: %s", error)
            return problem(
                503,
                "Service Unavailable",
                f"{error}; try again shortly",
                {"Retry-After": str(retry_after)},
            )
        log.error("store error", exc_info=error)
        return problem(500, "Internal Server Error", "the data store failed")

    @app.errorhandler(Exception)
    async def handle_unexpected(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return problem(500, "Internal Server Error", "an unexpected error occurred")


_HTTP_DETAILS: dict[int, str] = {
    404: "no such resource",
    405: "this method is not allowed here; see the Allow header",
    413: "the request body is too large",
}


def problem_schema() -> dict[str, Any]:
    """The JSON schema of a problem body, for the OpenAPI description."""
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    }
