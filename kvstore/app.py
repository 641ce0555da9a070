"""The application factory.

``create_app`` builds a Quart app from settings: routes, error handlers, the
OpenAPI document and the request middleware. The Redis pool is opened when
serving starts and closed when it stops, so creating an app costs nothing
and connects nowhere.
"""

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import Quart

from kvstore import __version__, api, openapi, probes
from kvstore.auth import install_auth
from kvstore.cors import with_cors
from kvstore.errors import register_error_handlers
from kvstore.limits import HeadChecks
from kvstore.logs import log_access, request_id_var
from kvstore.metrics import install_metrics
from kvstore.settings import Settings
from kvstore.store import Store, StoreError, open_store

log = logging.getLogger(__name__)

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

# Called once per request with method, route template, status and seconds.
RequestObserver = Callable[[str, str, int, float], None]

# The status logged for a request whose client left before any answer.
CLIENT_CLOSED_REQUEST = 499

_REQUEST_ID_HEADER = b"x-request-id"
_MAX_REQUEST_ID_LENGTH = 128


def create_app(settings: Settings | None = None, store: Store | None = None) -> Quart:
    """Build the kvstore app.

    ``settings`` default to ``Settings.from_env()``. ``store`` is for tests
    and embedding: when given it is used as is and not closed by the app;
    otherwise ``open_store`` opens the one the settings describe (a single
    server, a cluster found behind ``redis_url``, or sentinels) when serving
    starts. Raises ``ValueError`` if neither a store, a Redis URL nor
    sentinels are given, and ``SettingsError`` if the API tokens cannot be
    read.
    """
    settings = settings or Settings.from_env()
    if store is None and settings.redis_url is None and not settings.redis_sentinels:
        raise ValueError("KVSTORE_REDIS_URL is not set and no store was given")
    app = Quart("kvstore", static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        # A streamed read of millions of keys may take longer than any fixed
        # response timeout; each Redis call within it has its own deadline.
        RESPONSE_TIMEOUT=None,
        # A client that sends its body too slowly gets a 408 instead of holding
        # a connection and a request task for as long as it likes.
        BODY_TIMEOUT=settings.body_timeout,
    )
    app.url_map.merge_slashes = False
    app.url_map.converters["key"] = api.KeyConverter
    holder = api.StoreHolder()
    if store is not None:
        holder.store = store

    @app.before_serving
    async def setup_store() -> None:
        if store is None:
            holder.store = await open_store(settings)
        log.info(
            "kvstore %s serving", __version__, extra={"settings": settings.public()}
        )
        try:
            await holder.store.ping()
        except StoreError:
            # Not fatal: requests get 503s until Redis answers, and the
            # store logs when it does.
            log.warning("redis does not answer yet; serving 503 until it does")

    @app.after_serving
    async def close_store() -> None:
        if store is None:
            await holder.store.aclose()
            log.info("redis pool closed")

    app.register_blueprint(api.create_blueprint(settings, holder))
    app.register_blueprint(probes.create_blueprint(holder))
    register_error_handlers(app, settings.retry_after)
    app.register_blueprint(openapi.create_blueprint(settings))
    metrics = install_metrics(app, settings, holder)
    install_auth(app, settings)
    app.extensions["kvstore.holder"] = holder
    checked = HeadChecks(app.asgi_app, settings.max_header_bytes)
    middleware = RequestMiddleware(
        with_cors(checked, settings), route_templates(app), [metrics.observe_request]
    )
    app.extensions["kvstore.observers"] = middleware.observers
    app.asgi_app = middleware  # type: ignore[method-assign]
    return app


def route_templates(app: Quart) -> Callable[[str], str]:
    """A function from a request path to its route template.

    Access lines and metrics are labelled by template (``/keys/{id}``), never
    by the raw path, so a million keys never make a million labels. Paths that
    match no route become ``other``.
    """
    exact: set[str] = set()
    prefixes: list[tuple[str, str]] = []
    for rule in app.url_map.iter_rules():
        if "<" in rule.rule:
            static, _, _ = rule.rule.partition("<")
            prefixes.append((static, static + "{id}"))
        else:
            exact.add(rule.rule)

    def template(path: str) -> str:
        if path in exact:
            return path
        for static, route in prefixes:
            if path.startswith(static):
                return route
        return "other"

    return template


class RequestMiddleware:
    """Request id, access line and observers for every HTTP request.

    The client's ``X-Request-ID`` is kept when it is short printable ASCII;
    otherwise a new one is made. The id is echoed on the response and set in
    the logging context. The access line is written when the response is
    complete (streamed bodies included), or with status 499 when the client
    left before an answer started.
    """

    def __init__(
        self,
        app: ASGIApp,
        template: Callable[[str], str],
        observers: list[RequestObserver],
    ) -> None:
        self.app = app
        self.template = template
        self.observers = observers

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope["headers"]) or os.urandom(16).hex()
        token = request_id_var.set(request_id)
        id_header = (_REQUEST_ID_HEADER, request_id.encode())
        status = CLIENT_CLOSED_REQUEST

        async def send_with_id(message: ASGISendEvent) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message["headers"], id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            method = scope["method"]
            route = self.template(scope["path"])
            log_access(method, route, status, started)
            if self.observers:
                elapsed = time.perf_counter() - started
                for observer in self.observers:
                    observer(method, route, status, elapsed)
            request_id_var.reset(token)


def _client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == _REQUEST_ID_HEADER:
            if 0 < len(value) <= _MAX_REQUEST_ID_LENGTH and value.isascii():
                text = value.decode()
                if text.isprintable():
                    return text
            return None
    return None
