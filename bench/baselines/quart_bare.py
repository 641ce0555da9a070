"""Benchmark baseline, not part of the product: the bare Quart + Redis stack.

The least a Quart app on Hypercorn can do to serve kvstore's single-key
routes: one redis.asyncio pool per worker (bounded as kvstore's is), one
Redis command per request, no logging, metrics or validation beyond parsing
the body. It is the ceiling the
real service is measured against.

Run it with ``hypercorn --workers 2 --worker-class uvloop
bench/baselines/quart_bare.py:app``. ``KVSTORE_REDIS_URL`` and
``KVSTORE_KEY_PREFIX`` are read as the real service reads them, so both see
the same data.
"""

import json
import os

from quart import Quart, Response, request
from redis.asyncio import BlockingConnectionPool, Redis

REDIS_URL = os.environ.get("KVSTORE_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("KVSTORE_KEY_PREFIX", "kvstore:")
# Bounded like kvstore's pool (same variable, same default): requests wait
# for a free connection instead of opening one per concurrent request.
MAX_CONNECTIONS = int(os.environ.get("KVSTORE_REDIS_MAX_CONNECTIONS", "64"))
JSON_TYPE = "application/json"

app = Quart(__name__)


class _Backend:
    """Holds the worker's Redis client between startup and shutdown."""

    client: Redis | None = None


def redis_client() -> Redis:
    """Return the worker's Redis client; only valid while the app serves."""
    if _Backend.client is None:
        raise RuntimeError("the Redis client is used outside of serving")
    return _Backend.client


@app.before_serving
async def open_redis() -> None:
    """Create the pool; connections are opened lazily on the serving loop."""
    pool = BlockingConnectionPool.from_url(REDIS_URL, max_connections=MAX_CONNECTIONS)
    _Backend.client = Redis(connection_pool=pool)


@app.after_serving
async def close_redis() -> None:
    """Close the pool's connections."""
    if _Backend.client is not None:
        await _Backend.client.aclose()
        _Backend.client = None


@app.route("/keys/<key_id>", methods=["GET", "HEAD"])
async def read_key(key_id: str) -> Response:
    """Answer GET with ``{id: value}`` and HEAD with the key's existence."""
    if request.method == "HEAD":
        found = await redis_client().exists(KEY_PREFIX + key_id)
        return Response(b"", status=200 if found else 404, content_type=JSON_TYPE)

    raw = await redis_client().get(KEY_PREFIX + key_id)
    if raw is None:
        return Response(b'{"error":"not found"}', status=404, content_type=JSON_TYPE)

    # Values are stored as compact JSON already, so the body is spliced
    # together instead of decoding and re-encoding the value. The client
    # does not decode responses, so ``raw`` is bytes; str is narrowed for mypy.
    value = raw.encode() if isinstance(raw, str) else raw
    body = b"{" + json.dumps(key_id).encode() + b":" + value + b"}"
    return Response(body, content_type=JSON_TYPE)


@app.route("/keys/<key_id>", methods=["PUT"])
async def write_key(key_id: str) -> Response:
    """Store the JSON body; 201 when the key is new, 200 when replaced."""
    data = await request.get_data()
    try:
        value = json.loads(data)
    except ValueError:
        return Response(b'{"error":"invalid JSON"}', status=400, content_type=JSON_TYPE)

    compact = json.dumps(value, separators=(",", ":"))
    previous = await redis_client().set(KEY_PREFIX + key_id, compact, get=True)
    return Response(b"", status=201 if previous is None else 200)
