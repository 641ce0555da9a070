"""A TCP proxy that adds a fixed delay to every chunk, in both directions.

Put between a service and Redis, it turns loopback's tens of microseconds
into a round trip like a network hop's (0.5 ms each way gives 1 ms), which
``tc netem`` would do if it were available. Bytes are forwarded unchanged and
in order: each chunk read from one side is written to the other side once
`delay` has passed since it was read.

The event loop uses ``select()`` on purpose: epoll and poll take their
timeout in whole milliseconds, so a 0.5 ms timer would fire after 1 ms,
while select's microsecond timeout keeps the delay close to what was asked.
The cost is select's limit of 1024 descriptors, so the proxy refuses
connections beyond `--max-connections` (500 by default), logging each.

Run it with ``python -m bench.delay_proxy --listen-port 7000
--upstream-port 6379 --delay-ms 0.5``.
"""

import argparse
import asyncio
import collections
import ctypes
import logging
import selectors
import signal
from collections.abc import Sequence
from typing import cast

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Each proxied connection holds two descriptors; select() cannot watch
# descriptors numbered 1024 or above, and a few are taken already.
DEFAULT_MAX_CONNECTIONS = 500
# Logged on each refusal; the benchmark runner counts these lines.
REFUSAL_MESSAGE = "refusing a connection"
PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000


class DelayLine:
    """Writes chunks to a transport `delay` seconds after they were pushed.

    The delay is the same for every chunk, so deadlines only grow and a FIFO
    keeps them in order; a single timer is armed for the oldest chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._pending: collections.deque[tuple[float, bytes | None]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None
        self._queued_bytes = 0
        self.target: asyncio.Transport | None = None

    @property
    def queued_bytes(self) -> int:
        """Bytes pushed but not yet handed to the target transport."""
        return self._queued_bytes

    def push(self, data: bytes | None) -> None:
        """Queue `data` for writing; None queues a half-close (EOF)."""
        self._pending.append((self._loop.time() + self._delay, data))
        self._queued_bytes += len(data) if data else 0
        self._arm()

    def attach(self, target: asyncio.Transport) -> None:
        """Start writing to `target`; chunks already due are written now."""
        self.target = target
        self._arm()

    def cancel(self) -> None:
        """Drop whatever is queued and disarm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._queued_bytes = 0

    def _arm(self) -> None:
        if self._timer is None and self._pending and self.target is not None:
            deadline = self._pending[0][0]
            self._timer = self._loop.call_at(deadline, self._flush)

    def _flush(self) -> None:
        self._timer = None
        target = self.target
        if target is None or target.is_closing():
            self.cancel()
            return

        now = self._loop.time()
        due: list[bytes] = []
        end_of_stream = False
        while self._pending and self._pending[0][0] <= now:
            _, data = self._pending.popleft()
            if data is None:
                # Nothing is pushed after an EOF.
                end_of_stream = True
                break
            due.append(data)
            self._queued_bytes -= len(data)
        if due:
            target.write(b"".join(due))
        if end_of_stream:
            self._end(target)
        else:
            self._arm()

    def _end(self, target: asyncio.Transport) -> None:
        """Half-close `target` after its last bytes, or close it if it cannot."""
        self.cancel()
        if target.can_write_eof():
            try:
                target.write_eof()
            except OSError:
                # The peer is already gone (reset); closing is all that is left.
                log.debug("half-close failed; closing instead", exc_info=True)
            else:
                return
        target.close()


class _Side(asyncio.Protocol):
    """One socket of a proxied pair; what it reads goes to its peer's line."""

    def __init__(self, proxy: "DelayProxy", *, accepted: bool) -> None:
        self._proxy = proxy
        self._accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        # Chunks travelling towards this side's socket.
        self.inbound = DelayLine(proxy.loop, proxy.delay)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Stream connections always get a Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.inbound.attach(self.transport)
        if self._accepted:
            # Nothing is read from the client until its upstream exists.
            self.transport.pause_reading()
            self._proxy.open_upstream(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.inbound.push(data)

    def eof_received(self) -> bool:
        if self.peer is not None:
            self.peer.inbound.push(None)
        # Keep the transport open: the peer may still send its last bytes.
        return True

    def pause_writing(self) -> None:
        # This socket's send buffer is full: stop reading what feeds it.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.inbound.cancel()
        self._proxy.clients.discard(self)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            # Let the bytes already read reach the peer before it closes.
            peer.inbound.push(None)
            self._proxy.loop.call_later(self._proxy.delay * 2, peer.transport.close)


class DelayProxy:
    """Accepts connections and pairs each with a new upstream connection."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        upstream: tuple[str, int],
        delay: float,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.loop = loop
        self.upstream = upstream
        self.delay = delay
        self.max_connections = max_connections
        self.clients: set[_Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        """Close every proxied connection, both sides."""
        for client in list(self.clients):
            for side in (client, client.peer):
                if side is not None and side.transport is not None:
                    side.transport.close()

    def accept(self) -> asyncio.Protocol:
        """Protocol factory for the listening server."""
        return _Side(self, accepted=True)

    def open_upstream(self, client: _Side) -> None:
        """Start connecting `client` to the upstream server."""
        if client.transport is None:
            return
        if len(self.clients) >= self.max_connections:
            log.warning("%s: %d open", REFUSAL_MESSAGE, len(self.clients))
            client.transport.close()
            return

        self.clients.add(client)
        task = self.loop.create_task(self._connect(client, client.transport))
        # The loop keeps only weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: _Side, transport: asyncio.Transport) -> None:
        upstream = _Side(self, accepted=False)
        upstream.peer, client.peer = client, upstream
        try:
            await self.loop.create_connection(lambda: upstream, *self.upstream)
        except OSError:
            log.exception("cannot connect upstream to %s:%d", *self.upstream)
            transport.close()
            return

        if client.closed:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        transport.resume_reading()


async def serve(
    listen_port: int,
    upstream_port: int,
    delay: float,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    upstream_host: str = LOOPBACK,
) -> None:
    """Proxy 127.0.0.1:`listen_port` to the upstream until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    proxy = DelayProxy(loop, (upstream_host, upstream_port), delay, max_connections)
    server = await loop.create_server(proxy.accept, LOOPBACK, listen_port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "proxying %s:%d to %s:%d with %.3f ms each way",
        LOOPBACK,
        listen_port,
        upstream_host,
        upstream_port,
        delay * 1000,
    )
    async with server:
        await stop.wait()
        proxy.close()


def reduce_timer_slack() -> None:
    """Ask Linux to wake this process on time rather than up to 50 us late.

    The default timer slack would add a tenth of the delay to every chunk.
    Where prctl is missing (not Linux) the default slack stays.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot change the timer slack on this system")
        return
    if result != 0:
        log.warning("prctl(PR_SET_TIMERSLACK) failed: errno %d", ctypes.get_errno())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return an event loop whose timers have microsecond resolution."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-host", default=LOOPBACK)
    parser.add_argument("--delay-ms", type=float, default=0.5, help="each way")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    reduce_timer_slack()
    loop = new_event_loop()
    try:
        loop.run_until_complete(
            serve(
                args.listen_port,
                args.upstream_port,
                args.delay_ms / 1000,
                args.max_connections,
                args.upstream_host,
            )
        )
    finally:
        loop.close()


if __name__ == "__main__":
    main()
