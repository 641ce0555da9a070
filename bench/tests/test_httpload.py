"""The HEAD-capable load driver's parsing and statistics."""

import pytest

from bench.httpload import ResponseError, parse_head, percentile


def test_head_response_headers_are_read() -> None:
    head = b"HTTP/1.1 404 \r\ncontent-length: 66\r\nConnection: keep-alive"

    assert parse_head(head) == (404, 66, False)


def test_http_10_and_connection_close_close_the_connection() -> None:
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0")[2] is True
    assert parse_head(b"HTTP/1.1 200 OK\r\nConnection: close")[2] is True


def test_chunked_responses_are_refused() -> None:
    with pytest.raises(ResponseError):
        parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")


def test_percentile_uses_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 1001)]

    assert percentile(values, 50) == 500.0
    assert percentile(values, 99.9) == 999.0
    assert percentile([], 99) == 0.0
