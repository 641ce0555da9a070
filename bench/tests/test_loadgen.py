"""Reading wrk's and redis-benchmark's output."""

import pytest

from bench.loadgen import (
    LoadGeneratorError,
    parse_redis_benchmark_csv,
    parse_wrk_output,
)

WRK_STDOUT = """Running 10s test @ http://127.0.0.1:5000
  1 threads and 64 connections
Requests/sec:   3000.00
BENCH_RESULT {"requests":30000,"duration_us":10000000,"bytes":1,"sent":30064,\
"capped":false,"errors":{"connect":0,"read":1,"write":2,"status":3,"timeout":4},\
"latency_us":{"mean":2000.5,"stdev":10.0,"max":90000,"p50":1500,"p90":3000,\
"p99":9000,"p999":20000}}
"""


def test_wrk_result_line_is_read() -> None:
    result = parse_wrk_output(WRK_STDOUT)

    assert result.rps == pytest.approx(3000.0)
    assert result.latency.p50 == pytest.approx(1.5)
    assert result.latency.p999 == pytest.approx(20.0)
    assert (result.errors.status, result.errors.socket) == (3, 3)
    assert result.errors.timeout == 4


def test_wrk_output_without_result_line_is_an_error() -> None:
    with pytest.raises(LoadGeneratorError):
        parse_wrk_output("Running 10s test\n")


def test_redis_benchmark_row_with_json_in_the_command_is_read() -> None:
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",'
        '"p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
        '"SET k {"n":1,"tags":["a","b"]}","50000.00","0.500","0.100","0.450",'
        '"0.800","1.200","3.000"\n'
    )

    result = parse_redis_benchmark_csv(text, 100_000)

    assert result.rps == pytest.approx(50_000.0)
    assert result.duration_s == pytest.approx(2.0)
    assert result.latency.p99 == pytest.approx(1.2)
    assert result.latency.p999 is None
