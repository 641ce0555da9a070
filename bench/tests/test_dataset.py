"""Key names, values and filters agree across the suite's parts."""

from pathlib import Path

from bench.baselines.flask_sync import filter_to_glob
from bench.dataset import glob_for, key_id, value_json

WRK_COMMON = Path(__file__).resolve().parent.parent / "wrk" / "common.lua"


def test_key_ids_have_the_width_of_redis_benchmark_random_numbers() -> None:
    assert key_id(42) == "key-000000000042"
    assert len(key_id(0)) == len("key-") + len("__rand_int__")


def test_values_are_compact_json_as_the_wrk_scripts_write_them() -> None:
    lua_format = '{"n":%d,"name":"item-%d","tags":["bench","kv"]}'

    assert value_json(7) == lua_format.replace("%d", "7")
    assert lua_format in WRK_COMMON.read_text()


def test_glob_escapes_redis_pattern_characters() -> None:
    assert glob_for("kv:", "a*b[c]") == "kv:a\\*b\\[c\\]*"


def test_flask_filter_treats_dollar_as_wildcard() -> None:
    assert filter_to_glob("user-$-x?") == "user-*-x\\?"
