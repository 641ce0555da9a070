"""What the most expensive allowed filter costs over 100,000 keys.

Redis matches a glob by backtracking, and Redis runs one command at a time:
a slow match stalls every client. Filters are limited to
``KVSTORE_MAX_FILTER_WILDCARDS`` runs of ``$``; this measures filters built
to make the allowed maximum as slow as possible, over keys built to match
them almost everywhere, both end to end and per SCAN page.
"""

import time
from pathlib import Path

import pytest
import redis

from kvstore.app import create_app
from kvstore.settings import Settings
from tests.services import report, start_redis

KEY_COUNT = 100_000
KEY_BYTES = 1000

# Each almost matches every key and fails only at the end, after trying
# every way of spreading the key over its wildcards.
WORST_FILTERS = [
    "$a$a$a$a$a$a$a$b",
    "$" + "a" * 900 + "$a$a$a$a$a$a$b",
    "a$a$a$a$a$a$a$a$b",
]


@pytest.mark.slow
async def test_worst_allowed_filters_over_100k_keys_stay_fast(tmp_path: Path) -> None:
    redis_server = start_redis(tmp_path / "redis")
    admin = redis.Redis.from_url(redis_server.url)
    pipe = admin.pipeline(transaction=False)
    for number in range(KEY_COUNT):
        pipe.set(b"kvstore:" + b"a" * (KEY_BYTES - 8) + b"%08d" % number, b"1")
        if number % 10_000 == 9_999:
            pipe.execute()
    admin.config_set("slowlog-log-slower-than", 0)
    admin.config_set("slowlog-max-len", 10_000)
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path)
    app = create_app(settings)
    timings: dict[str, float] = {}
    try:
        async with app.test_app():
            client = app.test_client()
            for pattern in WORST_FILTERS:
                admin.slowlog_reset()
                started = time.perf_counter()
                read = await client.get("/keys", query_string={"filter": pattern})
                body = await read.get_json()
                timings[pattern] = time.perf_counter() - started
                assert read.status_code == 200
                assert body == {}
            scans = [
                entry["duration"]
                for entry in admin.slowlog_get(10_000)
                if entry["command"].startswith(b"SCAN")
            ]
            refused = await client.get("/keys", query_string={"filter": "$a" * 9})
    finally:
        admin.close()
        redis_server.stop()

    slowest = max(timings.values())
    report(
        "worst-allowed-filter",
        keys=KEY_COUNT,
        key_bytes=KEY_BYTES,
        slowest_read_s=round(slowest, 2),
        longest_scan_page_ms=round(max(scans) / 1000, 1),
        scan_pages=len(scans),
    )
    assert refused.status_code == 400
    assert slowest <= 15.0
    # One page of the scan blocks Redis for every client; it must stay short.
    assert max(scans) <= 250_000
