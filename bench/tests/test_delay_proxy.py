"""The delay proxy forwards bytes unchanged, in order, and late by the delay.

These run on the test's default event loop; the delay is long enough that
its millisecond timer resolution does not matter.
"""

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bench.delay_proxy import DelayProxy

DELAY = 0.005


class Echo:
    """An upstream server that sends back what it reads, until EOF."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.writers.add(writer)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()


@dataclass
class Proxied:
    proxy: DelayProxy
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def proxied() -> AsyncIterator[Proxied]:
    loop = asyncio.get_running_loop()
    echo = Echo()
    upstream = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    proxy = DelayProxy(loop, ("127.0.0.1", upstream_port), DELAY)
    server = await loop.create_server(proxy.accept, "127.0.0.1", 0)
    yield Proxied(proxy, server.sockets[0].getsockname()[1])
    proxy.close()
    for writer in echo.writers:
        writer.close()
    # Let the closes reach both ends before the loop goes away.
    await asyncio.sleep(4 * DELAY)
    server.close()
    upstream.close()
    await server.wait_closed()
    await upstream.wait_closed()


async def test_round_trip_takes_twice_the_delay(proxied: Proxied) -> None:
    reader, writer = await proxied.connect()

    started = time.perf_counter()
    writer.write(b"ping")
    reply = await reader.readexactly(4)
    elapsed = time.perf_counter() - started

    assert reply == b"ping"
    assert 2 * DELAY <= elapsed < 2 * DELAY + 0.05
    writer.close()
    await writer.wait_closed()


async def test_many_chunks_arrive_in_order(proxied: Proxied) -> None:
    reader, writer = await proxied.connect()
    chunks = [f"{n:06d};".encode() for n in range(2000)]

    for chunk in chunks:
        writer.write(chunk)
        if chunk.startswith(b"0000"):
            await asyncio.sleep(0)
    received = await reader.readexactly(sum(map(len, chunks)))

    assert received == b"".join(chunks)
    writer.close()
    await writer.wait_closed()


async def test_large_payload_survives_backpressure(proxied: Proxied) -> None:
    reader, writer = await proxied.connect()
    payload = bytes(range(256)) * 40_000

    writer.write(payload)
    received = await reader.readexactly(len(payload))

    assert received == payload
    writer.close()
    await writer.wait_closed()


async def test_half_close_reaches_the_upstream(proxied: Proxied) -> None:
    reader, writer = await proxied.connect()

    writer.write(b"last words")
    writer.write_eof()
    received = await reader.read()

    assert received == b"last words"
    writer.close()
    await writer.wait_closed()


async def test_reset_connections_are_released(proxied: Proxied) -> None:
    for _ in range(20):
        reader, writer = await proxied.connect()
        writer.write(b"x" * 1000)
        await reader.readexactly(1000)
        # A zero linger time makes close() send a reset instead of a FIN.
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, linger
        )
        writer.close()

    await asyncio.sleep(10 * DELAY)

    assert proxied.proxy.clients == set()
