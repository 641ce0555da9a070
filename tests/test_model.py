"""The API against a model: random operation sequences, any difference fails.

Hypothesis drives the app (through the test client, on the real test Redis)
with single and bulk writes, with and without ``expire_in``, reads, HEAD,
deletes, and filtered reads and deletes, and compares every answer with a
plain dict of what should be stored.

Time is handled two ways. Keys written with a long lifetime never expire
during a run; their ``Expires-In`` must stay between the lifetime minus the
time since the write and the lifetime. Keys written with ``expire_in=1``
expire for real: the model knows the window in which Redis may drop them,
accepts either answer inside it, and insists on the right one outside it.
A rule that waits a second is allowed once per run.
"""

import asyncio
import dataclasses
import math
import os
import re
import time
import uuid
from typing import Any, ClassVar, cast
from urllib.parse import quote, unquote, urlencode

import orjson
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from quart import Quart

from kvstore.app import create_app
from kvstore.settings import Settings

JSON_HEADERS = {"Content-Type": "application/json"}

# How far Redis's clock and expiry may stray from ours, in seconds.
SLACK = 0.05

LONG_LIFETIMES = st.integers(min_value=1000, max_value=10 * 365 * 24 * 3600)

# Characters that stress paths, globs and the filter syntax, plus non-ASCII.
KEY_ALPHABET = "ab/%?#&=+ *[]\\$.é中✓"
SOME_KEYS = ["a", "b", "a/b", "a$b", "ab", "a?", "a*", "%41", "é", "[a]", "a b", "\\a"]
# Filters whose glob characters a careless translation would let match more.
TRICKY_FILTERS = [
    "a?",
    "?",
    "*",
    "a*",
    "[ab]",
    "[a]",
    "a[!x]",
    "\\a",
    "a\\",
    "%$",
    "$b",
]

keys = st.one_of(
    st.sampled_from(SOME_KEYS),
    st.text(alphabet=KEY_ALPHABET, min_size=1, max_size=8),
)

# Values the API promises to keep exactly: JSON with integers within 64 bits
# and finite doubles; any other number is stored as a double.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=12,
)
lifetimes = st.one_of(st.none(), LONG_LIFETIMES, st.just(1))


@st.composite
def filters(draw: st.DrawFn) -> str:
    """A filter of key characters and at most eight runs of ``$``."""
    pieces = draw(
        st.lists(
            st.one_of(st.just("$"), st.text(alphabet=KEY_ALPHABET, max_size=3)),
            min_size=1,
            max_size=6,
        )
    )
    pattern = "".join(pieces)
    if not pattern:
        return "$"
    if len(re.findall(r"\$+", pattern)) > 8:
        return pattern.replace("$", "")[:5] + "$"
    return pattern


@st.composite
def wildcarded(draw: st.DrawFn, key: str) -> str:
    """``key`` with some of its characters replaced by ``$``."""
    positions = draw(st.sets(st.integers(0, len(key) - 1), max_size=3))
    return "".join("$" if n in positions else c for n, c in enumerate(key))


@dataclasses.dataclass
class Stored:
    """The model's view of one key."""

    value: Any
    lifetime: int | None
    # Earliest and latest moment the write can have taken effect.
    written_from: float
    written_by: float

    def alive(self, asked_from: float, asked_by: float) -> bool | None:
        """True, False, or None when a request in that window could see either."""
        if self.lifetime is None:
            return True
        if asked_by < self.written_from + self.lifetime - SLACK:
            return True
        if asked_from > self.written_by + self.lifetime + SLACK:
            return False
        return None


def matches(pattern: str, key: str) -> bool:
    """The filter rule: ``$`` runs match any text, all else only itself."""
    regex = ".*".join(re.escape(piece) for piece in re.split(r"\$+", pattern))
    return re.fullmatch(regex, key, flags=re.DOTALL) is not None


def path(key: str) -> str:
    return "/keys/" + quote(key, safe="")


async def call_asgi(
    app: Quart, method: str, target: str, body: bytes | None
) -> tuple[int, dict[str, str], bytes]:
    """Send one request as Hypercorn would: raw path, body, then silence.

    The test client rewrites raw paths and HEAD responses, so the model
    talks to the ASGI app directly.
    """
    raw_path, _, query = target.partition("?")
    messages: list[dict[str, Any]] = []
    answered = asyncio.Event()
    inbox = [{"type": "http.request", "body": body or b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    headers = [(b"host", b"kvstore")]
    if body is not None:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    scope = {
        "type": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 5000),
        "extensions": {},
    }
    await cast(Any, app)(scope, receive, send)
    start = messages[0]
    response_headers = {
        name.decode().lower(): value.decode() for name, value in start["headers"]
    }
    content = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], response_headers, content


class ApiMachine(RuleBasedStateMachine):
    """Drives one app on a fresh key prefix and keeps the model beside it."""

    # The test's settings; each run adds a key prefix of its own.
    base: ClassVar[Settings]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        prefix = f"{self.base.key_prefix}{uuid.uuid4().hex[:8]}:"
        self.app: Quart = create_app(dataclasses.replace(self.base, key_prefix=prefix))
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.serving = self.loop.create_task(self.serve())
        self.loop.run_until_complete(self.started.wait())
        self.model: dict[str, Stored] = {}
        self.waited = False

    async def serve(self) -> None:
        """Keep the app serving (its Redis pool open) until teardown."""
        async with self.app.test_app():
            self.started.set()
            await self.stopping.wait()

    def teardown(self) -> None:
        """Stop the app and close the loop."""
        self.stopping.set()
        self.loop.run_until_complete(self.serving)
        self.loop.close()

    def request(
        self, method: str, target: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes, float, float]:
        """Send one request: status, headers, body and the time window."""

        async def send() -> tuple[int, dict[str, str], bytes]:
            return await call_asgi(self.app, method, target, body)

        started = time.monotonic()
        status, headers, data = self.loop.run_until_complete(send())
        return status, headers, data, started, time.monotonic()

    def remember(
        self, pairs: dict[str, Any], lifetime: int | None, window: tuple[float, float]
    ) -> None:
        for key, value in pairs.items():
            self.model[key] = Stored(value, lifetime, *window)

    def created(self, key: str, window: tuple[float, float]) -> bool | None:
        """Whether a write of ``key`` in ``window`` must create it (None: either)."""
        stored = self.model.get(key)
        if stored is None:
            return True
        alive = stored.alive(*window)
        return None if alive is None else not alive

    @rule(key=keys, value=values, lifetime=lifetimes)
    def put_one(self, key: str, value: Any, lifetime: int | None) -> None:
        query = "" if lifetime is None else f"?expire_in={lifetime}"
        status, headers, _, started, ended = self.request(
            "PUT", path(key) + query, orjson.dumps(value)
        )

        expect_created = self.created(key, (started, ended))
        if expect_created is None:
            assert status in (200, 201)
        else:
            assert status == (201 if expect_created else 200)
        if status == 201:
            assert headers["location"] == path(key)
        self.remember({key: value}, lifetime, (started, ended))

    @rule(
        pairs=st.dictionaries(keys, values, min_size=1, max_size=5),
        lifetime=lifetimes,
    )
    def put_many(self, pairs: dict[str, Any], lifetime: int | None) -> None:
        query = "" if lifetime is None else f"?expire_in={lifetime}"
        status, _, body, started, ended = self.request(
            "PUT", "/keys" + query, orjson.dumps(pairs)
        )

        assert status == 200
        assert orjson.loads(body) == {"stored": len(pairs)}
        self.remember(pairs, lifetime, (started, ended))

    @rule(
        pairs=st.dictionaries(
            st.text(
                alphabet=KEY_ALPHABET.replace("$", ""), min_size=1, max_size=6
            ).filter(lambda key: key != "expire_in"),
            st.text(max_size=8),
            min_size=1,
            max_size=4,
        ),
        lifetime=st.one_of(st.none(), LONG_LIFETIMES),
    )
    def put_query_form(self, pairs: dict[str, str], lifetime: int | None) -> None:
        query = dict(pairs)
        if lifetime is not None:
            query["expire_in"] = str(lifetime)
        status, _, body, started, ended = self.request(
            "PUT", "/keys?" + urlencode(query, quote_via=quote)
        )

        assert status == 200
        assert orjson.loads(body) == {"stored": len(pairs)}
        self.remember(dict(pairs), lifetime, (started, ended))

    @rule(key=keys)
    def get(self, key: str) -> None:
        status, headers, body, started, ended = self.request("GET", path(key))

        alive = self.check_presence(key, status, started, ended)
        if alive:
            stored = self.model[key]
            assert orjson.loads(body) == {key: stored.value}
            self.check_expires_in(stored, headers, ended)

    @rule(key=keys)
    def head(self, key: str) -> None:
        status, headers, body, started, ended = self.request("HEAD", path(key))

        alive = self.check_presence(key, status, started, ended)
        if alive:
            # The server drops any body of a HEAD response; ours is empty.
            assert body == b""
            stored = self.model[key]
            expected = len(orjson.dumps({key: stored.value}))
            assert int(headers["content-length"]) == expected
            self.check_expires_in(stored, headers, ended)

    @rule(key=keys)
    def delete(self, key: str) -> None:
        status, _, _, started, ended = self.request("DELETE", path(key))

        self.check_presence(key, 200 if status == 204 else status, started, ended)
        self.model.pop(key, None)

    def draw_filter(self, data: st.DataObject) -> str:
        """A random filter, a tricky one, or one built from a stored key."""
        choices = [filters(), st.sampled_from(TRICKY_FILTERS)]
        if self.model:
            choices.append(st.sampled_from(sorted(self.model)).flatmap(wildcarded))
        return data.draw(st.one_of(choices))

    @rule(data=st.data())
    def read_filtered(self, data: st.DataObject) -> None:
        pattern = self.draw_filter(data)
        status, _, body, started, ended = self.request(
            "GET", "/keys?" + urlencode({"filter": pattern}, quote_via=quote)
        )

        assert status == 200
        found = orjson.loads(body)
        for key, stored in list(self.model.items()):
            if not matches(pattern, key):
                assert key not in found
                continue
            alive = stored.alive(started, ended)
            if alive is None:
                if key not in found:
                    del self.model[key]
                    continue
            elif not alive:
                assert key not in found
                del self.model[key]
                continue
            assert found[key] == stored.value
        assert set(found) <= set(self.model)

    @rule(data=st.data())
    def delete_filtered(self, data: st.DataObject) -> None:
        pattern = self.draw_filter(data)
        status, _, body, started, ended = self.request(
            "DELETE", "/keys?" + urlencode({"filter": pattern}, quote_via=quote)
        )

        assert status == 200
        deleted = orjson.loads(body)["deleted"]
        certain = uncertain = 0
        for key, stored in list(self.model.items()):
            if matches(pattern, key):
                alive = stored.alive(started, ended)
                certain += alive is True
                uncertain += alive is None
                del self.model[key]
        assert certain <= deleted <= certain + uncertain

    @precondition(
        lambda self: (
            not self.waited
            and any(stored.lifetime == 1 for stored in self.model.values())
        )
    )
    @rule()
    def wait_for_short_lifetimes(self) -> None:
        self.waited = True
        time.sleep(1 + 2 * SLACK)

    def check_presence(
        self, key: str, status: int, started: float, ended: float
    ) -> bool:
        """Check a 200/404 against the model; return whether the key is there."""
        assert status in (200, 404)
        stored = self.model.get(key)
        alive = False if stored is None else stored.alive(started, ended)
        if alive is None:
            alive = status == 200
            if not alive:
                del self.model[key]
        elif stored is not None and not alive:
            del self.model[key]
        assert status == (200 if alive else 404)
        return alive

    @staticmethod
    def check_expires_in(stored: Stored, headers: dict[str, str], now: float) -> None:
        if stored.lifetime is None:
            assert "expires-in" not in headers
            return
        left = int(headers["expires-in"])
        lowest = math.floor(stored.lifetime - (now - stored.written_from) - SLACK)
        assert max(1, lowest) <= left <= stored.lifetime


def test_api_behaves_like_a_dict_with_expiry_times(settings: Settings) -> None:
    class Machine(ApiMachine):
        base = settings

    run_state_machine_as_test(Machine, settings=settings_for_machine)


settings_for_machine = hypothesis_settings(
    max_examples=int(os.environ.get("KVSTORE_TEST_MODEL_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
