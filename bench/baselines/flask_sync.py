"""Benchmark baseline, not part of the product: Flask, gunicorn and redis-py.

A key-value service written the way such services usually are: synchronous
Flask views under gunicorn sync workers, a module-level redis-py client, and
values decoded and re-encoded with ``jsonify``. Besides the single-key routes
it has ``GET /keys?filter=`` done with SCAN and pipelined MGET, so the real
service's bulk read has a conventional counterpart.

Run it with ``gunicorn --workers 2 --chdir bench/baselines flask_sync:app``.
``KVSTORE_REDIS_URL`` and ``KVSTORE_KEY_PREFIX`` are read as the real service
reads them, so both see the same data.
"""

import json
import os
from typing import Any

from flask import Flask, Response, jsonify, request
from redis import Redis

REDIS_URL = os.environ.get("KVSTORE_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("KVSTORE_KEY_PREFIX", "kvstore:")
SCAN_COUNT = 1000
MGET_BATCH = 1000
GLOB_SPECIALS = frozenset("*?[]\\")

app = Flask(__name__)

# gunicorn imports the app in each worker after the fork, so every worker
# gets its own connection pool.
redis_client = Redis.from_url(REDIS_URL, decode_responses=True)


def filter_to_glob(pattern: str) -> str:
    """Translate a filter where ``$`` matches any run of characters to a glob.

    Glob metacharacters in the filter are escaped so they match literally.
    """
    parts: list[str] = []
    for char in pattern:
        if char == "$":
            parts.append("*")
        elif char in GLOB_SPECIALS:
            parts.append("\\" + char)
        else:
            parts.append(char)
    return "".join(parts)


def error(status: int, message: str) -> Response:
    """Return a small JSON error response."""
    response = jsonify(error=message)
    response.status_code = status
    return response


@app.route("/keys/<key_id>", methods=["GET", "HEAD"])
def read_key(key_id: str) -> Response:
    """Answer GET with ``{id: value}`` and HEAD with the key's existence."""
    if request.method == "HEAD":
        found = redis_client.exists(KEY_PREFIX + key_id)
        return Response(status=200 if found else 404)

    raw = redis_client.get(KEY_PREFIX + key_id)
    if raw is None:
        return error(404, "not found")
    return jsonify({key_id: json.loads(raw)})


@app.route("/keys/<key_id>", methods=["PUT"])
def write_key(key_id: str) -> Response:
    """Store the JSON body; 201 when the key is new, 200 when replaced."""
    try:
        value = json.loads(request.get_data())
    except ValueError:
        return error(400, "invalid JSON")

    compact = json.dumps(value, separators=(",", ":"))
    previous = redis_client.set(KEY_PREFIX + key_id, compact, get=True)
    return Response(status=201 if previous is None else 200)


@app.route("/keys", methods=["GET"])
def read_keys() -> Response:
    """Return every pair whose id matches ``?filter=`` (all pairs without one)."""
    pattern = KEY_PREFIX + filter_to_glob(request.args.get("filter", "$"))
    names = list(redis_client.scan_iter(match=pattern, count=SCAN_COUNT))

    pipeline = redis_client.pipeline(transaction=False)
    for start in range(0, len(names), MGET_BATCH):
        pipeline.mget(names[start : start + MGET_BATCH])
    batches: list[list[str | None]] = pipeline.execute()

    pairs: dict[str, Any] = {}
    values = (value for batch in batches for value in batch)
    for name, raw in zip(names, values, strict=True):
        # A key deleted between SCAN and MGET comes back as None; skip it.
        if raw is not None:
            pairs[name.removeprefix(KEY_PREFIX)] = json.loads(raw)
    return jsonify(pairs)
