"""Checks on the request head, made before any route sees the request.

Two gaps of the HTTP/1.1 server are closed here:

- Hypercorn refuses a request head that it has to buffer past
  ``h11_max_incomplete_size`` while waiting for the rest of it, but a head
  that arrives in one read is parsed whole, whatever its size. A request
  whose target and headers add up to more than ``max_bytes`` is answered
  431 here, so the limit holds however the bytes arrive.
- A request with both ``Content-Length`` and ``Transfer-Encoding`` is framed
  by the latter, and the connection stays open for the next request. A proxy
  in front that frames by the former would then see a different request
  boundary (request smuggling), so such a request is refused with 400.

Refusals are problem+json with ``Connection: close``: nothing more is read
from a connection whose framing or size is in doubt.
"""

from collections.abc import Awaitable, Callable

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from kvstore.errors import PROBLEM_JSON, problem_body

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

HEADER_FIELDS_TOO_LARGE = 431


def head_size(scope: HTTPScope) -> int:
    """Bytes of the request target and header fields, as sent on the wire.

    Counts the raw path, the query string and each header's name and value,
    plus the separators (``?``, ``": "`` and CRLF) they travel with.
    """
    size = len(scope["raw_path"] or scope["path"].encode())
    if scope["query_string"]:
        size += 1 + len(scope["query_string"])
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return size


def has_ambiguous_framing(scope: HTTPScope) -> bool:
    """True when the request carries both Content-Length and Transfer-Encoding."""
    names = {name.lower() for name, _ in scope["headers"]}
    return b"content-length" in names and b"transfer-encoding" in names


class HeadChecks:
    """Refuse an HTTP request whose head is too large or ambiguously framed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI scope, or refuse its HTTP request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif head_size(scope) > self.max_bytes:
            await refuse(
                send,
                HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                f"the request target and headers may have at most "
                f"{self.max_bytes} bytes",
            )
        elif has_ambiguous_framing(scope):
            await refuse(
                send,
                400,
                "Bad Request",
                "a request may not have both Content-Length and Transfer-Encoding",
            )
        else:
            await self.app(scope, receive, send)


async def refuse(send: ASGISendCallable, status: int, title: str, detail: str) -> None:
    """Answer with a problem and close the connection after it."""
    body = problem_body(status, title, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
