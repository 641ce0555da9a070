"""uvicorn's httptools protocol, with a time limit on each request head.

uvicorn closes a connection left idle between requests, but not one still
sending the head of a request: a client that sends a few bytes of a request
line, or nothing at all, and then waits holds its connection for good, and
enough of them hold every file descriptor. ``TimedHeadProtocol`` closes a
connection whose request head is not complete within ``KEEP_ALIVE_TIMEOUT``
seconds of the connection opening or of the request's first byte, the
limit Hypercorn applies. Imported only when ``KVSTORE_SERVER=uvicorn``.
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvstore.cli import KEEP_ALIVE_TIMEOUT


class TimedHeadProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that drops a client too slow to send a request head."""

    head_timeout: float = KEEP_ALIVE_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the connection and the clock for its first request head."""
        super().connection_made(transport)
        self._start_head_timer()

    def on_message_begin(self) -> None:
        """Start the clock for the head of the request that just began."""
        super().on_message_begin()
        self._start_head_timer()

    def on_headers_complete(self) -> None:
        """The head arrived in time: stop the clock, serve the request."""
        self._stop_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock with the connection."""
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.transport.close()
