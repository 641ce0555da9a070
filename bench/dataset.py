"""The benchmark's data in Redis, and the in-process floors that read it.

Key ids are ``key-`` and a 12-digit number, the form redis-benchmark's
``__rand_int__`` produces, so HTTP targets and redis-benchmark touch the same
keys. Values are small compact JSON objects, the way kvstore stores them.
Data is written straight into Redis with pipelined MSET, which loads a
million keys in seconds where HTTP would take minutes.

The floors do in this process, with redis-py, the least work a bulk read or
bulk delete needs, so the HTTP targets can be shown as a ratio to them.
"""

import json
import logging
import time
from collections.abc import Iterator

import orjson
from redis import Redis

log = logging.getLogger(__name__)

KEY_ID_PREFIX = "key-"
MSET_PAIRS = 1000
PIPELINE_COMMANDS = 50
SCAN_COUNT = 1000
BATCH = 1000


def key_id(number: int) -> str:
    """Return the id of preloaded key `number` (without the Redis prefix)."""
    return f"{KEY_ID_PREFIX}{number:012d}"


def value_json(number: int) -> str:
    """Return the compact JSON value stored under key `number`."""
    value = {"n": number, "name": f"item-{number}", "tags": ["bench", "kv"]}
    return json.dumps(value, separators=(",", ":"))


def glob_for(key_prefix: str, id_prefix: str) -> str:
    """Return the Redis glob matching every key whose id starts with `id_prefix`."""
    escaped = "".join("\\" + char if char in "*?[]\\" else char for char in id_prefix)
    return f"{key_prefix}{escaped}*"


class Dataset:
    """Keeps the benchmark Redis holding exactly ``key-0 .. key-(N-1)``.

    The Redis server belongs to the benchmark alone, so loading starts with
    FLUSHALL. Scenarios that change the key set (bulk delete) call
    `invalidate` so the next `ensure` reloads.
    """

    def __init__(self, client: Redis, key_prefix: str) -> None:
        self._client = client
        self._key_prefix = key_prefix
        self._loaded: int | None = None

    def ensure(self, keys: int) -> None:
        """Make Redis hold exactly `keys` preloaded keys, loading if needed."""
        if self._loaded == keys:
            return
        self.load(keys)

    def invalidate(self) -> None:
        """Forget what is loaded, so that the next `ensure` reloads."""
        self._loaded = None

    def load(self, keys: int) -> None:
        """Replace everything in Redis with `keys` preloaded keys."""
        started = time.perf_counter()
        self._client.flushall()
        pipeline = self._client.pipeline(transaction=False)
        queued = 0
        for start in range(0, keys, MSET_PAIRS):
            stop = min(start + MSET_PAIRS, keys)
            pipeline.mset(
                {self._redis_key(n): value_json(n) for n in range(start, stop)}
            )
            queued += 1
            if queued == PIPELINE_COMMANDS:
                pipeline.execute()
                queued = 0
        if queued:
            pipeline.execute()

        count = self._client.dbsize()
        if count != keys:
            raise RuntimeError(f"loaded {keys} keys but Redis holds {count}")
        self._loaded = keys
        log.info("loaded %d keys in %.1f s", keys, time.perf_counter() - started)

    def _redis_key(self, number: int) -> str:
        return self._key_prefix + key_id(number)


def _scan(client: Redis, pattern: str) -> Iterator[bytes]:
    for name in client.scan_iter(match=pattern, count=SCAN_COUNT):
        # The client is made without decode_responses, so names are bytes;
        # the check narrows redis-py's wide return type.
        if isinstance(name, bytes):
            yield name


def read_matching(client: Redis, key_prefix: str, pattern: str) -> tuple[int, bytes]:
    """Return how many pairs match `pattern` and the JSON object holding them.

    SCAN, then MGET in pipelined batches, then splice the stored JSON values
    into one object without decoding them: the least work that produces the
    response body of ``GET /keys?filter=``.
    """
    names = list(_scan(client, pattern))
    pipeline = client.pipeline(transaction=False)
    for start in range(0, len(names), BATCH):
        pipeline.mget(names[start : start + BATCH])
    batches: list[list[bytes | None]] = pipeline.execute()

    strip = len(key_prefix.encode())
    members: list[bytes] = []
    values = (value for batch in batches for value in batch)
    for name, raw in zip(names, values, strict=True):
        if raw is not None:
            members.append(orjson.dumps(name[strip:].decode()) + b":" + raw)
    return len(members), b"{" + b",".join(members) + b"}"


def delete_matching(client: Redis, pattern: str) -> int:
    """Delete every key matching `pattern` with SCAN and batched UNLINK."""
    deleted = 0
    batch: list[bytes] = []
    for name in _scan(client, pattern):
        batch.append(name)
        if len(batch) == BATCH:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted
