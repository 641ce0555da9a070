"""Charging py-spy samples to packages."""

from bench.profile import OTHER, category, shares

COLLAPSED = [
    "_run (hypercorn/asyncio/run.py:233);Runner.run (asyncio/runners.py:118) 7",
    "read_one (kvstore/api.py:104);RedisStore.get (kvstore/store.py:310) 3",
    "send (redis/asyncio/connection.py:1189);writelines (asyncio/streams.py:346) 5",
    "Quart.handle_request (quart/app.py:1465) 4",
    "tm_mon (tm_year) 1",
    " 9",
]


def test_samples_are_charged_to_the_innermost_frame() -> None:
    counts, total = shares(COLLAPSED)

    assert counts == {
        "event loop": 7,
        "kvstore": 3,
        "socket writes": 5,
        "Quart, Werkzeug, Blinker": 4,
        OTHER: 1,
    }
    assert total == 20


def test_frames_are_matched_by_their_file_not_their_function() -> None:
    assert category("kvstore_like (quart/wrappers/base.py:99)") == (
        "Quart, Werkzeug, Blinker"
    )
    assert category("Task.done (asyncio/tasks.py:10)") == "asyncio (tasks, timeouts)"
    assert category("helper (mylib/kvstore/x.py:1)") == OTHER
