"""Redis topologies under test, and helpers for tests that change them.

``RedisTopology`` says how the service is pointed at a deployment;
``Traffic`` runs versioned writes and reads against the app and records
every answer that breaks the rules, for tests that move slots or fail over
primaries while requests run.
"""

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from quart.typing import TestClientProtocol as QuartClient

from kvstore.embedded import EmbeddedCluster, EmbeddedSentinelGroup, free_port
from kvstore.settings import Settings
from kvstore.store import StoreUnavailableError
from tests.helpers import wait_until_healthy

TOPOLOGIES = ("standalone", "cluster", "sentinel")

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclasses.dataclass(frozen=True)
class RedisTopology:
    """One Redis deployment under test, and how the service is pointed at it.

    ``environ`` holds the ``KVSTORE_*`` variables that select it; ``client``
    opens a synchronous client that follows it (the cluster client offers the
    commands tests use of ``redis.Redis``).
    """

    name: str
    environ: dict[str, str]
    client: Callable[[], redis.Redis]

    def settings(self, **fields: Any) -> Settings:
        """Settings on this deployment, with ``fields`` on top."""
        return dataclasses.replace(Settings.from_env(self.environ), **fields)


class ClusterClient(redis.RedisCluster):
    """The cluster client, with ``MSET`` and ``MGET`` over keys of any slot.

    Tests look behind the API with the multi-key commands of ``redis.Redis``;
    the cluster runs those per slot, which is all looking needs. ``close``
    closes every connection.
    """

    def mset(self, mapping: Mapping[Any, Any]) -> bool:
        """Set every pair, slot by slot."""
        return all(self.mset_nonatomic(mapping))

    def mget(self, keys: Any, *args: Any) -> list[Any]:
        """Get every key, slot by slot."""
        return list(self.mget_nonatomic(keys, *args))

    def close(self) -> None:
        """Close every connection, the one to the node first asked included.

        redis-py's ``close`` leaves that one to the garbage collector, whose
        ResourceWarning would fail whichever test it happens in.
        """
        super().close()
        for node in self.nodes_manager.startup_nodes.values():
            if node.redis_connection is not None:
                node.redis_connection.close()


def cluster_topology(cluster: EmbeddedCluster) -> RedisTopology:
    """The topology of a running ``EmbeddedCluster``."""

    def connect() -> redis.Redis:
        return cast(redis.Redis, ClusterClient.from_url(cluster.url))

    return RedisTopology("cluster", {"KVSTORE_REDIS_URL": cluster.url}, connect)


def sentinel_topology(group: EmbeddedSentinelGroup) -> RedisTopology:
    """The topology of a running ``EmbeddedSentinelGroup``."""
    addresses = ",".join(f"{host}:{port}" for host, port in group.sentinel_addresses)

    def connect() -> redis.Redis:
        host, _, port = group.primary_address().rpartition(":")
        return redis.Redis(host=host, port=int(port))

    environ = {
        "KVSTORE_REDIS_SENTINELS": addresses,
        "KVSTORE_REDIS_SENTINEL_SERVICE": group.service,
    }
    return RedisTopology("sentinel", environ, connect)


def remove_prefix(client: redis.Redis, prefix: str) -> None:
    """Unlink every key under ``prefix``, on every primary of a cluster."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


@contextlib.contextmanager
def serve_process(
    topology: RedisTopology, prefix: str, log_path: Path, server: str = "hypercorn"
) -> Iterator[str]:
    """Run ``kvstore serve`` on ``topology`` at a free port; yield its URL."""
    port = free_port()
    environ = {
        **os.environ,
        **topology.environ,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_KEY_PREFIX": prefix,
        "KVSTORE_SERVER": server,
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve"],
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=15)


@dataclasses.dataclass
class Traffic:
    """Writers and readers of versioned values, checking every answer.

    Each key has one writer, which stores increasing versions; ``acked``
    holds the last version a 2xx answered. A read must give a version no
    older than the one acknowledged before it started and no newer than the
    last one tried. ``problems`` lists every answer that broke the rules.
    """

    client: QuartClient
    keys: list[str]
    acked: dict[str, int] = dataclasses.field(default_factory=dict)
    tried: dict[str, int] = dataclasses.field(default_factory=dict)
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    slowest: float = 0.0

    def count(self, status: int, started: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.slowest = max(self.slowest, time.monotonic() - started)
        if status not in (200, 201, 204, 404, 503):
            self.problems.append(f"status {status}")

    async def write(self, key: str) -> None:
        version = self.tried.get(key, 0) + 1
        self.tried[key] = version
        started = time.monotonic()
        response = await self.client.put(
            f"/keys/{key}", data=str(version).encode(), headers=JSON_HEADERS
        )
        self.count(response.status_code, started)
        if response.status_code in (200, 201):
            self.acked[key] = version

    async def read(self, key: str) -> None:
        floor = self.acked.get(key, 0)
        started = time.monotonic()
        response = await self.client.get(f"/keys/{key}")
        self.count(response.status_code, started)
        if response.status_code == 200:
            self.check(key, (await response.get_json())[key], floor)
        elif response.status_code == 404 and floor:
            self.problems.append(f"{key}: 404 after version {floor} was stored")

    async def read_all(self) -> None:
        floors = dict(self.acked)
        started = time.monotonic()
        try:
            response = await self.client.get("/keys")
        except StoreUnavailableError:
            # A failure after the first batch ends the streamed body early,
            # which a client sees as a broken document, never a wrong one.
            self.count(503, started)
            return
        self.count(response.status_code, started)
        if response.status_code != 200:
            return
        pairs = orjson.loads(await response.get_data())
        for key, floor in floors.items():
            if key not in pairs:
                self.problems.append(f"full read lost {key} (version {floor})")
            else:
                self.check(key, pairs[key], floor)

    def check(self, key: str, version: int, floor: int) -> None:
        if not floor <= version <= self.tried[key]:
            self.problems.append(
                f"{key}: read version {version}, stored {floor}, "
                f"last tried {self.tried[key]}"
            )

    async def run(self, stop: asyncio.Event, full_reads: bool = True) -> None:
        """Write and read every key in turn until ``stop`` is set."""

        async def worker(keys: list[str]) -> None:
            while not stop.is_set():
                for key in keys:
                    await self.write(key)
                    await self.read(key)

        async def scanner() -> None:
            while not stop.is_set():
                await self.read_all()
                await asyncio.sleep(0.05)

        shares = [self.keys[index::4] for index in range(4)]
        tasks = [worker(share) for share in shares]
        if full_reads:
            tasks.append(scanner())
        await asyncio.gather(*tasks)


async def run_during(traffic: Traffic, change: threading.Thread) -> None:
    """Run ``traffic`` before, during and shortly after ``change``."""
    stop = asyncio.Event()
    running = asyncio.create_task(traffic.run(stop))
    await asyncio.sleep(0.3)
    change.start()
    await asyncio.to_thread(change.join)
    await asyncio.sleep(1.0)
    stop.set()
    await running
