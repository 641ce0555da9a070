"""Load and consistency test: many connections, a mixed workload, then a check.

``python -m bench.load`` starts its own Redis and ``kvstore serve`` (two
workers, access logs to a file, API tokens and CORS on), or targets a running
service with ``--url`` and ``--redis-url`` (and ``--token`` if it has API
tokens). It keeps ``--connections`` (default 200) clients busy for
``--duration`` seconds (default 60) with single-key GET, HEAD, PUT and DELETE,
bulk PUT with and without ``expire_in``, and wildcard GET, then:

- counts 5xx responses, socket errors and timeouts, which must all be zero;
- checks every response against what the client knows it wrote (statuses,
  GET bodies, wildcard results);
- reads every key it wrote without expiry straight from Redis and compares
  it with the value it last wrote (and checks deleted keys are gone and
  kept keys have no TTL).

Each client owns its own keys, so its requests on a key are sequential and
the expected state is exact. Keys live under a per-run id prefix and are
removed afterwards. The exit status is 0 only if every check passed.
"""

import argparse
import asyncio
import json
import logging
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from redis import Redis

from bench.dataset import BATCH, glob_for
from bench.procs import exit_on_sigterm, raise_open_files_limit
from bench.targets import (
    KVSTORE,
    RedisServer,
    ServerSettings,
    new_api_token,
    parse_kvstore_env,
    start_server,
)

log = logging.getLogger("bench.load")

REQUEST_TIMEOUT = 10.0
JSON_HEADERS = {"Content-Type": "application/json"}
# Relative weights of the operations each client picks from.
WEIGHTS = {
    "get": 30,
    "head": 10,
    "put": 15,
    "bulk_put": 15,
    "bulk_put_expiring": 10,
    "wildcard": 5,
    "delete": 15,
}


class Mark(Enum):
    """States of a key that are not a value the client wrote."""

    ABSENT = "absent"  # deleted, or never written
    UNKNOWN = "unknown"  # the last write or delete failed: either could hold


ABSENT = Mark.ABSENT
UNKNOWN = Mark.UNKNOWN


@dataclass
class Stats:
    """Counts over the whole run."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    mismatches: list[str] = field(default_factory=list)

    def mismatch(self, message: str) -> None:
        """Record a response that disagrees with what the client expects."""
        if len(self.mismatches) < 1000:
            self.mismatches.append(message)
        else:
            self.mismatches[-1] = f"{message} (and more)"


@dataclass
class Check:
    """What the final read-back from Redis found."""

    checked: int = 0
    present: int = 0
    unchecked: int = 0
    mismatches: list[str] = field(default_factory=list)


@dataclass
class Budget:
    """The run's bounds: a deadline and a total request count."""

    deadline: float
    remaining: int

    def take(self) -> bool:
        """Use up one request; False once the run is over."""
        if self.remaining <= 0 or time.monotonic() >= self.deadline:
            return False
        self.remaining -= 1
        return True


def random_value(rng: random.Random) -> Any:
    """A JSON value of a random type, small enough to write often."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randrange(-(10**12), 10**12)
    if kind == 1:
        return rng.random() * 1000
    if kind == 2:
        return f"text-{rng.randrange(10**6)}-é✓"
    if kind == 3:
        return [rng.randrange(100) for _ in range(rng.randrange(5))]
    if kind == 4:
        return {"n": rng.randrange(1000), "ok": rng.random() < 0.5, "tags": ["a"]}
    if kind == 5:
        return rng.random() < 0.5
    return None


class Client:
    """One simulated client: its own keys, its expected state, its requests."""

    def __init__(
        self,
        number: int,
        run_id: str,
        keys: int,
        session: aiohttp.ClientSession,
        base_url: str,
        budget: Budget,
        stats: Stats,
    ) -> None:
        self.prefix = f"load-{run_id}-w{number}-"
        self.tracked = [f"{self.prefix}k{i}" for i in range(keys)]
        self.expiring = [f"{self.prefix}t{i}" for i in range(keys)]
        self.state: dict[str, Any] = dict.fromkeys(self.tracked, ABSENT)
        self._session = session
        self._base_url = base_url
        self._budget = budget
        self._stats = stats
        # Seeded per client so a run can be repeated; this is load, not secrets.
        self._rng = random.Random(f"{run_id}-{number}")  # noqa: S311
        self._operations = list(WEIGHTS)
        self._weights = list(WEIGHTS.values())

    async def run(self) -> None:
        """Send requests until the budget runs out."""
        while self._budget.take():
            operation = self._rng.choices(self._operations, self._weights)[0]
            self._stats.requests[operation] += 1
            try:
                await getattr(self, f"_{operation}")()
            except TimeoutError:
                self._stats.timeouts += 1
            except aiohttp.ClientError as exc:
                self._stats.socket_errors += 1
                log.debug("socket error on %s: %s", operation, exc)

    def _url(self, path: str) -> str:
        return self._base_url + path

    def _key_url(self, key: str) -> str:
        return self._url("/keys/" + quote(key, safe=""))

    def _status(self, operation: str, status: int, allowed: Sequence[int]) -> bool:
        self._stats.statuses[status] += 1
        if status >= 500:
            self._stats.server_errors += 1
            return False
        if status not in allowed:
            self._stats.mismatch(f"{operation}: HTTP {status}, expected {allowed}")
            return False
        return True

    def _expected_statuses(
        self, key: str, found: int = 200, missing: int = 404
    ) -> tuple[int, ...]:
        state = self.state[key]
        if state is UNKNOWN:
            return (found, missing)
        return (missing,) if state is ABSENT else (found,)

    async def _get(self) -> None:
        key = self._rng.choice(self.tracked)
        async with self._session.get(self._key_url(key)) as response:
            body = await response.read()
        if not self._status("get", response.status, self._expected_statuses(key)):
            return
        state = self.state[key]
        if response.status == 200 and state is not UNKNOWN:
            document = json.loads(body)
            if document != {key: state}:
                self._stats.mismatch(f"GET {key}: {document!r}, expected {state!r}")

    async def _head(self) -> None:
        key = self._rng.choice(self.tracked)
        async with self._session.head(self._key_url(key)) as response:
            await response.read()
        self._status("head", response.status, self._expected_statuses(key))

    async def _put(self) -> None:
        key = self._rng.choice(self.tracked)
        value = random_value(self._rng)
        self.state[key] = UNKNOWN
        async with self._session.put(
            self._key_url(key), data=json.dumps(value), headers=JSON_HEADERS
        ) as response:
            await response.read()
        if self._status("put", response.status, (200, 201)):
            self.state[key] = value

    async def _bulk_put(self) -> None:
        chosen = self._rng.sample(self.tracked, min(len(self.tracked), 10))
        pairs = {key: random_value(self._rng) for key in chosen}
        for key in chosen:
            self.state[key] = UNKNOWN
        async with self._session.put(
            self._url("/keys"), data=json.dumps(pairs), headers=JSON_HEADERS
        ) as response:
            await response.read()
        if self._status("bulk_put", response.status, (200,)):
            self.state.update(pairs)

    async def _bulk_put_expiring(self) -> None:
        chosen = self._rng.sample(self.expiring, min(len(self.expiring), 10))
        pairs = {key: random_value(self._rng) for key in chosen}
        expire_in = self._rng.randrange(1, 6)
        async with self._session.put(
            self._url(f"/keys?expire_in={expire_in}"),
            data=json.dumps(pairs),
            headers=JSON_HEADERS,
        ) as response:
            await response.read()
        self._status("bulk_put_expiring", response.status, (200,))

    async def _wildcard(self) -> None:
        pattern = quote(f"{self.prefix}k$", safe="")
        async with self._session.get(self._url(f"/keys?filter={pattern}")) as response:
            body = await response.read()
        if not self._status("wildcard", response.status, (200,)):
            return
        document = json.loads(body)
        if not isinstance(document, dict):
            self._stats.mismatch(f"wildcard: not an object: {body[:100]!r}")
            return
        for key, state in self.state.items():
            if state is UNKNOWN:
                continue
            if state is ABSENT and key in document:
                self._stats.mismatch(f"wildcard: deleted {key} is listed")
            elif state is not ABSENT and document.get(key, ABSENT) != state:
                self._stats.mismatch(f"wildcard: {key} is {document.get(key)!r}")
        if unexpected := set(document) - set(self.state):
            self._stats.mismatch(f"wildcard: foreign keys {sorted(unexpected)[:3]}")

    async def _delete(self) -> None:
        key = self._rng.choice(self.tracked)
        allowed = self._expected_statuses(key, found=204)
        self.state[key] = UNKNOWN
        async with self._session.delete(self._key_url(key)) as response:
            await response.read()
        if self._status("delete", response.status, allowed):
            self.state[key] = ABSENT


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_redis(clients: Sequence[Client], redis: Redis, key_prefix: str) -> Check:
    """Compare what the clients expect with what Redis holds, key by key."""
    check = Check()
    expected = {
        key: state
        for client in clients
        for key, state in client.state.items()
        if state is not UNKNOWN
    }
    names = list(expected)
    for batch in _batches(names, BATCH):
        pipeline = redis.pipeline(transaction=False)
        pipeline.mget([key_prefix + key for key in batch])
        for key in batch:
            pipeline.pttl(key_prefix + key)
        raw_values, *ttls = pipeline.execute()
        for key, raw, ttl in zip(batch, raw_values, ttls, strict=True):
            problem = _compare(key, expected[key], raw, ttl)
            if problem is not None:
                check.mismatches.append(problem)
    check.checked = len(names)
    check.present = sum(1 for state in expected.values() if state is not ABSENT)
    check.unchecked = sum(
        1 for client in clients for state in client.state.values() if state is UNKNOWN
    )
    return check


def _compare(key: str, state: Any, raw: bytes | None, ttl: int) -> str | None:
    """Describe how Redis disagrees with the expected state; None if it agrees."""
    if state is ABSENT:
        if raw is not None:
            return f"Redis: deleted {key} still holds {raw[:60]!r}"
        return None
    if raw is None:
        return f"Redis: {key} is missing"
    if json.loads(raw) != state:
        return f"Redis: {key} holds {raw[:60]!r}, wrote {state!r}"
    if ttl != -1:
        return f"Redis: {key} written without expiry has TTL {ttl} ms"
    return None


def remove_run_keys(redis: Redis, key_prefix: str, run_id: str) -> int:
    """Delete every key this run wrote, tracked or expiring."""
    pattern = glob_for(key_prefix, f"load-{run_id}-")
    deleted = 0
    batch: list[Any] = []
    for name in redis.scan_iter(match=pattern, count=1000):
        batch.append(name)
        if len(batch) == BATCH:
            deleted += int(redis.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(redis.unlink(*batch))
    return deleted


async def drive(
    base_url: str,
    connections: int,
    duration: float,
    max_requests: int,
    keys: int,
    token: str | None = None,
) -> tuple[list[Client], Stats, float, str]:
    """Run the workload; return the clients, the counts, the time and run id."""
    run_id = secrets.token_hex(4)
    stats = Stats()
    budget = Budget(time.monotonic() + duration, max_requests)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        clients = [
            Client(n, run_id, keys, session, base_url, budget, stats)
            for n in range(connections)
        ]
        started = time.monotonic()
        await asyncio.gather(*(client.run() for client in clients))
        elapsed = time.monotonic() - started
    return clients, stats, elapsed, run_id


def render_summary(
    stats: Stats, check: Check, elapsed: float, connections: int
) -> tuple[str, bool]:
    """Return a text summary and whether the run passed."""
    total = sum(stats.requests.values())
    failures = {
        "5xx responses": stats.server_errors,
        "socket errors": stats.socket_errors,
        "timeouts": stats.timeouts,
        "unexpected responses": len(stats.mismatches),
        "Redis mismatches": len(check.mismatches),
    }
    passed = not any(failures.values())
    lines = [
        f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s) "
        f"over {connections} connections",
        "by operation: "
        + ", ".join(f"{op} {count}" for op, count in sorted(stats.requests.items())),
        "by status: "
        + ", ".join(f"{code} {n}" for code, n in sorted(stats.statuses.items())),
        f"checked in Redis: {check.checked} keys ({check.present} present, "
        f"{check.checked - check.present} deleted; {check.unchecked} left "
        "unchecked after failed requests)",
        *(f"{name}: {count}" for name, count in failures.items()),
        *(f"  {message}" for message in [*stats.mismatches, *check.mismatches][:20]),
        "PASS" if passed else "FAIL",
    ]
    return "\n".join(lines) + "\n", passed


def _kvstore_variable(text: str) -> tuple[str, str]:
    try:
        return parse_kvstore_env(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", help="a running service; default: start one")
    parser.add_argument("--redis-url", help="its Redis (required with --url)")
    parser.add_argument(
        "--token", help="bearer token for a service started with API tokens"
    )
    parser.add_argument("--key-prefix", default="kvstore:")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--keys", type=int, default=20, help="keys per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kvstore-env",
        type=_kvstore_variable,
        action="append",
        default=[],
        metavar="KVSTORE_NAME=VALUE",
        help="extra setting for the kvstore it starts; repeatable",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "tmp" / "load",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_against(args: argparse.Namespace, url: str, redis_url: str) -> bool:
    """Drive the service at `url`, check against `redis_url`; True if passed."""
    clients, stats, elapsed, run_id = asyncio.run(
        drive(
            url,
            args.connections,
            args.duration,
            args.max_requests,
            args.keys,
            args.token,
        )
    )
    redis = Redis.from_url(redis_url)
    try:
        check = check_redis(clients, redis, args.key_prefix)
        removed = remove_run_keys(redis, args.key_prefix, run_id)
    finally:
        redis.close()
    log.info("removed the run's %d keys", removed)

    summary, passed = render_summary(stats, check, elapsed, args.connections)
    sys.stdout.write(summary)
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; return 0 if it passed, 1 if not."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.url is None) != (args.redis_url is None):
        parser.error("--url and --redis-url go together")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    exit_on_sigterm()
    # Client sockets here, and the service's (it inherits the limit).
    raise_open_files_limit(4 * args.connections + 4096)

    if args.url is not None:
        return 0 if run_against(args, args.url.rstrip("/"), args.redis_url) else 1

    # The service it starts has every feature on, API tokens included.
    args.token = args.token or new_api_token()
    redis = RedisServer(args.log_dir)
    redis.start()
    try:
        settings = ServerSettings(
            redis_url=redis.url,
            key_prefix=args.key_prefix,
            workers=args.workers,
            backlog=2048,
            log_dir=args.log_dir,
            kvstore_env=tuple(args.kvstore_env),
            api_token=args.token,
        )
        server = start_server(KVSTORE, settings, "load")
        try:
            passed = run_against(args, server.url, redis.url)
        finally:
            server.child.stop()
    finally:
        redis.stop()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
