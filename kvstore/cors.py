"""Cross-origin resource sharing, for browser pages on other origins.

Off unless ``KVSTORE_CORS_ORIGINS`` lists origins (``https://app.example``,
comma-separated) or is ``*``. When on, every response, errors included,
carries the ``Access-Control-*`` headers the request's ``Origin`` earns, so a
page can read a 401 or a 503 as well as a value. Listed origins are echoed
back with ``Vary: Origin``; ``*`` lets every page read the API, which with no
tokens configured means any site a visitor opens can read and change the
data through their browser. Cookies are never involved: clients authenticate
with an ``Authorization`` header, which needs no credentialed CORS mode.

Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) are answered
by the app like any ``OPTIONS`` request, with the allowed methods, headers
and ``Access-Control-Max-Age`` added for an allowed origin.

This is an ASGI middleware rather than Quart-CORS: that extension rebuilds
its configuration from the app config on every response, which cost about a
fifth of a bare request's CPU even for requests without an ``Origin``.
Here the configuration is built once, and a request without ``Origin``
costs one header scan and one appended ``Vary``.
"""

from collections.abc import Awaitable, Callable, Iterable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from kvstore.settings import Settings

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

ALLOWED_METHODS = ("GET", "HEAD", "PUT", "DELETE")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Request-ID")
EXPOSED_HEADERS = (
    "X-Request-ID",
    "Expires-In",
    "Location",
    "Retry-After",
    "WWW-Authenticate",
)

_ORIGIN = b"origin"
_REQUEST_METHOD = b"access-control-request-method"
_REQUEST_HEADERS = b"access-control-request-headers"
_VARY = b"vary"
_VARY_ORIGIN = (_VARY, b"Origin")


def with_cors(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Wrap `app` in CORS handling for ``settings.cors_origins``, if any.

    With no origins `app` is returned as it is, and responses carry no CORS
    headers, so browsers keep pages of other origins from reading them.
    """
    if not settings.cors_origins:
        return app
    return CorsMiddleware(app, settings.cors_origins, settings.cors_max_age)


class CorsMiddleware:
    """Adds CORS response headers by the request's ``Origin``."""

    def __init__(self, app: ASGIApp, origins: Iterable[str], max_age: int) -> None:
        self.app = app
        origins = tuple(origins)
        self.any_origin = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")
        self.exposed = (
            b"access-control-expose-headers",
            ", ".join(EXPOSED_HEADERS).encode(),
        )
        self.methods = frozenset(m.encode() for m in ALLOWED_METHODS)
        self.allow_methods = (
            b"access-control-allow-methods",
            ", ".join(ALLOWED_METHODS).encode(),
        )
        self.headers = {name.lower(): name for name in ALLOWED_HEADERS}
        self.max_age = (b"access-control-max-age", str(max_age).encode())

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI scope, adding CORS headers to an HTTP response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        origin = request_method = requested = None
        for name, value in scope["headers"]:
            if name == _ORIGIN:
                origin = value
            elif name == _REQUEST_METHOD:
                request_method = value
            elif name == _REQUEST_HEADERS:
                requested = value
        added = self._headers_for(origin, scope["method"], request_method, requested)

        async def send_with_cors(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = _merged(message["headers"], added)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _headers_for(
        self,
        origin: bytes | None,
        method: str,
        request_method: bytes | None,
        requested: bytes | None,
    ) -> list[tuple[bytes, bytes]]:
        """The headers a response to this request gets."""
        if origin and self.any_origin:
            headers = [(b"access-control-allow-origin", b"*")]
        elif origin in self.origins:
            headers = [(b"access-control-allow-origin", origin), _VARY_ORIGIN]
        else:
            return [_VARY_ORIGIN]

        headers.append(self.exposed)
        if method == "OPTIONS" and request_method in self.methods:
            headers.append(self.allow_methods)
            allowed = self._allowed_headers(requested)
            if allowed:
                headers.append((b"access-control-allow-headers", allowed))
            headers.append(self.max_age)
        return headers

    def _allowed_headers(self, requested: bytes | None) -> bytes:
        """The requested headers that are allowed, comma-separated."""
        if not requested:
            return b""
        names = (
            item.strip().lower() for item in requested.decode("latin-1").split(",")
        )
        return ", ".join(self.headers[n] for n in names if n in self.headers).encode()


def _merged(
    headers: Iterable[tuple[bytes, bytes]], added: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """`headers` with `added`; a ``Vary`` the app set is extended, not repeated."""
    merged = list(headers)
    for name, value in added:
        if name == _VARY:
            for index, (existing, current) in enumerate(merged):
                if existing.lower() == _VARY:
                    merged[index] = (existing, current + b", " + value)
                    break
            else:
                merged.append((name, value))
        else:
            merged.append((name, value))
    return merged
