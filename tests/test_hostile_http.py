"""Hostile clients at the HTTP level, against a real ``kvstore serve``.

What the test client cannot show: raw bytes and percent-encoding in paths,
oversized request heads, clients that stall mid-head or mid-body, bodies on
GET and HEAD, pipelined requests. Each case gets a clear 4xx (or is served
correctly) and leaves what Redis holds unchanged.
"""

import time
import uuid
from collections.abc import Iterator

import h11
import pytest
import redis

from kvstore.cli import KEEP_ALIVE_TIMEOUT
from tests.services import Service, raw_exchange, running

BODY_TIMEOUT = 1.0

Snapshot = dict[bytes, object]


@pytest.fixture(scope="module", params=["hypercorn", "uvicorn"])
def service(
    request: pytest.FixtureRequest,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A live service on the test Redis with a one-second body timeout."""
    prefix = f"kvhostile:{uuid.uuid4().hex[:12]}:"
    settings = {
        "REDIS_URL": redis_url,
        "KEY_PREFIX": prefix,
        "BODY_TIMEOUT": str(BODY_TIMEOUT),
        "SERVER": request.param,
    }
    log_path = tmp_path_factory.mktemp("hostile") / "kvstore.log"
    with running(log_path, settings) as started:
        yield started
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.unlink(*keys)


@pytest.fixture
def stored(service: Service, redis_client: redis.Redis) -> Iterator["Stored"]:
    """What the service's prefix holds, with one sentinel key in it."""
    prefix = service.environ["KVSTORE_KEY_PREFIX"]
    redis_client.set(f"{prefix}sentinel", b'"kept"')
    yield Stored(redis_client, prefix)
    for key in redis_client.scan_iter(match=f"{prefix}*"):
        redis_client.unlink(key)


class Stored:
    """Snapshots of the keys under a prefix."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.before = self.now()

    def now(self) -> Snapshot:
        """Every key under the prefix, without it, and its value."""
        return {
            key.removeprefix(self.prefix.encode()): self.client.get(key)
            for key in self.client.scan_iter(match=f"{self.prefix}*")
        }

    def added(self) -> Snapshot:
        """Keys that are new or changed since the fixture began."""
        return {
            key: value
            for key, value in self.now().items()
            if self.before.get(key) != value
        }


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse every HTTP/1.1 response in ``data``: status, headers, body."""
    parser = h11.Connection(h11.CLIENT)
    parsed: list[tuple[int, dict[bytes, bytes], bytes]] = []
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(data)
    parser.receive_data(b"")
    status, headers, body = 0, {}, b""
    while True:
        event = parser.next_event()
        if isinstance(event, h11.Response):
            status, headers, body = event.status_code, dict(event.headers), b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            parsed.append((status, headers, body))
            if parser.our_state is h11.MUST_CLOSE or parser.their_state is h11.CLOSED:
                return parsed
            parser.start_next_cycle()
            parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            parser.send(h11.EndOfMessage())
        else:
            return parsed


def put_request(target: bytes, body: bytes = b"1", close: bool = True) -> bytes:
    """A raw PUT with a JSON body."""
    head = (
        b"PUT " + target + b" HTTP/1.1\r\nHost: kvstore\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


@pytest.mark.parametrize(
    ("target", "key"),
    [
        (b"/keys/a%2Fb", b"a/b"),
        (b"/keys/%2e%2e%2fhealthz", b"../healthz"),
        (b"/keys/../healthz", b"../healthz"),
        (b"/keys/..%2F..%2Fetc%2Fpasswd", b"../../etc/passwd"),
        (b"/keys/double%252F", b"double%2F"),
        (b"/keys/triple%25252F", b"triple%252F"),
        (b"/keys/%25", b"%"),
        (b"/keys/bare%", b"bare%"),
        (b"/keys/bad%G1escape", b"bad%G1escape"),
        (b"/keys/half%2", b"half%2"),
        (b"/keys/q%3Fmark", b"q?mark"),
        (b"/keys/hash%23", b"hash#"),
        (b"/keys/plus+sign", b"plus+sign"),
        (b"/keys/%E2%9C%93", "\u2713".encode()),
    ],
)
def test_percent_encoding_tricks_address_exactly_one_literal_key(
    service: Service, stored: Stored, target: bytes, key: bytes
) -> None:
    answer = responses(raw_exchange(service.port, put_request(target, b'"v"')))

    assert [status for status, _, _ in answer] == [201]
    assert stored.added() == {key: b'"v"'}


@pytest.mark.parametrize(
    "target",
    [
        b"/keys/%00",
        b"/keys/a%00b",
        b"/keys/%0D%0AX-Injected:%201",
        b"/keys/%C0%AF",
        b"/keys/%ED%A0%80",
        b"/keys/%FF%FE",
        b"/keys/%F4%90%80%80",
    ],
    ids=["nul", "inner-nul", "crlf", "overlong", "surrogate", "ff-fe", "beyond"],
)
def test_encoded_nul_control_or_invalid_utf8_in_a_key_is_400(
    service: Service, stored: Stored, target: bytes
) -> None:
    answer = responses(raw_exchange(service.port, put_request(target)))

    [(status, headers, _)] = answer
    assert status == 400
    assert headers[b"content-type"] == b"application/problem+json"
    assert b"x-injected" not in headers
    assert stored.added() == {}


@pytest.mark.parametrize(
    "request_",
    [
        b"PUT /keys/raw\x00nul HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /keys/raw\xff HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1",
        b"PUT /keys/sp ace HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1",
        b"GET /keys/x HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n",
        b"GET /keys/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["raw-nul", "raw-ff", "raw-space", "nul-header", "negative"],
)
def test_malformed_request_bytes_are_refused_with_400(
    service: Service, stored: Stored, request_: bytes
) -> None:
    answer = raw_exchange(service.port, request_)

    assert answer.startswith(b"HTTP/1.1 400")
    assert stored.added() == {}


def test_content_length_with_transfer_encoding_is_400_and_closes(
    service: Service, stored: Stored
) -> None:
    smuggled = put_request(b"/keys/smuggled", close=False)
    request_ = (
        b"PUT /keys/framed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\n1\r\n0\r\n\r\n" + smuggled
    )

    started = time.monotonic()
    answer = responses(raw_exchange(service.port, request_))
    elapsed = time.monotonic() - started

    # One answer, and the connection closed at once, not after idling.
    [(status, _, _)] = answer
    assert status == 400
    assert elapsed < KEEP_ALIVE_TIMEOUT
    assert stored.added() == {}


def test_head_over_the_limit_sent_at_once_is_431_problem(
    service: Service, stored: Stored
) -> None:
    big_header = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    request_ = put_request(b"/keys/big-head", close=False)
    request_ = request_.replace(b"Host: kvstore\r\n", b"Host: kvstore\r\n" + big_header)

    [(status, headers, body)] = responses(raw_exchange(service.port, request_))

    assert status == 431
    assert headers[b"content-type"] == b"application/problem+json"
    assert b"16384" in body
    assert stored.added() == {}


@pytest.mark.parametrize(
    "head",
    [
        b"GET /keys?filter=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /keys/x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % n for n in range(3000))
        + b"\r\n",
        b"GET /keys/x HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 200_000 + b"\r\n\r\n",
    ],
    ids=["long-query", "many-headers", "200-kb-header"],
)
def test_oversized_request_heads_are_431(
    service: Service, stored: Stored, head: bytes
) -> None:
    answer = raw_exchange(service.port, head)

    assert answer.startswith(b"HTTP/1.1 431")
    assert stored.added() == {}


def test_head_just_under_the_limit_is_served(service: Service, stored: Stored) -> None:
    padding = b"X-Pad: " + b"a" * 15_000 + b"\r\n"
    request_ = put_request(b"/keys/padded").replace(
        b"Host: kvstore\r\n", b"Host: kvstore\r\n" + padding
    )

    [(status, _, _)] = responses(raw_exchange(service.port, request_))

    assert status == 201
    assert stored.added() == {b"padded": b"1"}


def test_body_sent_too_slowly_is_408_and_stores_nothing(
    service: Service, stored: Stored
) -> None:
    request_ = put_request(b"/keys/slow", b"[1, 2, 3]")[:-5]

    started = time.monotonic()
    [(status, headers, _)] = responses(
        raw_exchange(service.port, request_, timeout=BODY_TIMEOUT + 10)
    )
    elapsed = time.monotonic() - started

    assert status == 408
    assert headers[b"content-type"] == b"application/problem+json"
    assert BODY_TIMEOUT <= elapsed <= BODY_TIMEOUT + 1.5
    assert stored.added() == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sent", "answered"),
    [
        (b"", b""),
        (b"PUT /keys/slowloris HTTP/1.1\r\nHost: x\r\nX-Wait: ", b""),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPUT /keys/slowloris HT", b"200"),
    ],
    ids=["nothing", "half-a-head", "half-the-next-head"],
)
def test_request_head_sent_too_slowly_is_dropped(
    service: Service, stored: Stored, sent: bytes, answered: bytes
) -> None:
    started = time.monotonic()
    answer = raw_exchange(service.port, sent, timeout=KEEP_ALIVE_TIMEOUT + 10)
    elapsed = time.monotonic() - started

    assert answer.count(b"HTTP/1.1 ") == (1 if answered else 0)
    assert answered in answer
    assert elapsed <= KEEP_ALIVE_TIMEOUT + 1.5
    assert stored.added() == {}


def test_body_on_get_is_ignored_and_never_read_as_a_request(
    service: Service, stored: Stored
) -> None:
    smuggled = put_request(b"/keys/smuggled", close=False)
    pipelined = (
        b"GET /keys/sentinel HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled
    )
    chunked = (
        b"GET /keys/sentinel HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(smuggled):x}".encode()
        + b"\r\n"
        + smuggled
        + b"\r\n0\r\n\r\n"
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    answer = responses(raw_exchange(service.port, pipelined + chunked + last))

    assert [(status, body) for status, _, body in answer] == [
        (200, b'{"sentinel":"kept"}'),
        (200, b'{"sentinel":"kept"}'),
        (200, b'{"status":"ok"}'),
    ]
    assert stored.added() == {}


def test_body_on_head_is_ignored(service: Service, stored: Stored) -> None:
    smuggled = put_request(b"/keys/smuggled-head", close=False)
    request_ = (
        b"HEAD /keys/sentinel HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    data = raw_exchange(service.port, request_ + last)

    assert data.startswith(b"HTTP/1.1 200")
    assert b"content-length: 19\r\n" in data
    assert data.count(b"HTTP/1.1 ") == 2
    assert data.endswith(b'{"status":"ok"}')
    assert stored.added() == {}
