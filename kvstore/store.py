"""The store: the only code that talks to Redis.

Routes call a ``Store`` with service keys (no prefix) and JSON text as bytes;
the store adds the key prefix, bounds every call with one deadline and turns
Redis failures into its own errors::

    StoreError                 anything Redis refused that the client did not cause
    ├── StoreUnavailableError  no connection, or Redis cannot serve right now
    └── StoreTimeoutError      no answer within the deadline

``RedisStore`` serves a single Redis server through one connection pool. The
``Store`` protocol is what the HTTP layer relies on, so another topology can
stand behind the same routes.
"""

import asyncio
import dataclasses
import logging
import ssl
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from kvstore.keys import escape_glob
from kvstore.settings import Settings, SettingsError, env_name

log = logging.getLogger(__name__)

# Reads a value and its remaining lifetime in one atomic step, so the
# ``Expires-In`` header always belongs to the value it is sent with. A miss
# answers 1 when the read found the key past its expiry and so removed it
# (the database shrank while nothing else could run), else 0.
GET_SCRIPT = """
local size = redis.call('DBSIZE')
local value = redis.call('GET', KEYS[1])
if not value then
    if redis.call('DBSIZE') < size then return 1 end
    return 0
end
return {value, redis.call('PTTL', KEYS[1])}
"""

# Size and lifetime without the value: HEAD answers with GET's headers,
# Content-Length included, while moving no value over the wire. A miss
# answers like GET's.
HEAD_SCRIPT = """
local size = redis.call('DBSIZE')
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
    if redis.call('DBSIZE') < size then return 1 end
    return 0
end
return {redis.call('STRLEN', KEYS[1]), ttl}
"""

# Sets one or many keys atomically. ARGV[1] is the lifetime in seconds or an
# empty string for none (SET without EX clears an earlier expiry); the values
# follow in key order. Returns how many of the keys existed before.
PUT_SCRIPT = """
local existed = 0
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
    existed = existed + redis.call('EXISTS', key)
    if ttl == '' then
        redis.call('SET', key, ARGV[i + 1])
    else
        redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
    end
end
return existed
"""

# Redis replies that mean "not now" rather than "never": a replica, a server
# loading its data set, out of memory or without a primary.
_UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "OOM", "BUSY", "TRYAGAIN")


# The ``kind`` of every store error: a short name of what went wrong, for
# metrics and logs; a fixed set, so it is safe as a metric label.
ERROR_KINDS = (
    "timeout",
    "connection",
    "auth",
    "loading",
    "readonly",
    "oom",
    "busy",
    "masterdown",
    "tryagain",
    "response",
    "other",
)


class StoreError(Exception):
    """Redis failed in a way the client did not cause.

    ``kind`` is one of ``ERROR_KINDS``.
    """

    kind: str = "other"


class StoreUnavailableError(StoreError):
    """Redis cannot be reached or cannot serve requests right now."""

    kind = "connection"


class StoreTimeoutError(StoreError):
    """Redis did not answer within the configured deadline."""

    kind = "timeout"


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """A stored value (compact JSON text) and its remaining lifetime."""

    value: bytes
    ttl_ms: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Meta:
    """What HEAD needs of a stored value: its size and remaining lifetime."""

    size: int
    ttl_ms: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """Connections of the pool: checked out, idle, and the most allowed."""

    in_use: int
    idle: int
    limit: int


class Store(Protocol):
    """What the HTTP layer needs from the data tier.

    Keys are service keys without the prefix. Values are compact JSON text.
    Every method raises ``StoreError`` subclasses only.
    """

    async def get(self, key: str) -> Entry | None:
        """The value of ``key`` and its lifetime, or None if there is none."""
        ...

    async def head(self, key: str) -> Meta | None:
        """The size and lifetime of ``key``'s value, or None if there is none."""
        ...

    async def put(self, key: str, value: bytes, expire_in: int | None) -> bool:
        """Store one value; True when the key did not exist before."""
        ...

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """Store all pairs or none of them."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""
        ...

    def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Batches of (key, value) for every key the glob matches.

        ``glob`` is a Redis glob over service keys, None for every key. A key
        appears at most once; keys that vanish during the scan are left out.
        """
        ...

    async def delete_matching(self, glob: str | None) -> int:
        """Remove every key the glob matches; return how many were removed."""
        ...

    async def ping(self) -> None:
        """Return when Redis answers; raise ``StoreError`` when it does not."""
        ...

    def pool_stats(self) -> PoolStats:
        """The connection pool's current use."""
        ...

    def expired_reads(self) -> int:
        """How many reads so far found their key expired, which removed it."""
        ...

    async def aclose(self) -> None:
        """Close every connection."""
        ...


class RedisStore:
    """A ``Store`` on one Redis server, through one blocking connection pool.

    Every call runs under a single deadline (``redis_timeout``) covering the
    wait for a pooled connection, connecting, retries and the reply; one timer
    per call costs less than redis-py's per-socket-operation timeouts.
    Connection errors are retried with jittered exponential backoff inside
    that deadline.
    """

    def __init__(self, client: "Redis", settings: Settings) -> None:
        self._redis = client
        self._prefix = settings.key_prefix
        self._prefix_bytes = settings.key_prefix.encode()
        self._prefix_glob = escape_glob(settings.key_prefix)
        self._timeout = settings.redis_timeout
        self._scan_batch = settings.scan_batch
        self._get_script = client.register_script(GET_SCRIPT)
        self._head_script = client.register_script(HEAD_SCRIPT)
        self._put_script = client.register_script(PUT_SCRIPT)
        self.reachable: bool | None = None
        self._expired_reads = 0

    @classmethod
    def from_settings(cls, settings: Settings, url: str) -> "RedisStore":
        """Create the store and its pool; nothing connects until first use.

        Raises ``SettingsError`` as ``connection_options`` does.
        """
        retry = Retry(
            ExponentialWithJitterBackoff(base=0.01, cap=0.25),
            settings.redis_retries,
            supported_errors=(redis_errors.ConnectionError,),
        )
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=None,
            # No per-operation socket timeout: the call's deadline is the only
            # clock. redis-py's own one (5 s unless set) wraps each send in
            # asyncio.wait_for, which on Python 3.11 can swallow the
            # deadline's cancellation when it lands as the send completes;
            # the call then waits out the socket timeout instead.
            socket_timeout=None,
            socket_connect_timeout=settings.redis_connect_timeout,
            retry=retry,
            **connection_options(settings),
        )
        client = Redis.from_pool(pool)
        return cls(client, settings)

    def _deadline(self) -> "_Guard":
        return _Guard(self, self._timeout)

    def _key(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _match(self, glob: str | None) -> str:
        return self._prefix_glob + ("*" if glob is None else glob)

    async def get(self, key: str) -> Entry | None:
        """See ``Store.get``."""
        async with self._deadline():
            reply = await self._get_script(keys=[self._key(key)])
        if not isinstance(reply, list):
            self._expired_reads += int(reply)
            return None
        value, ttl = reply
        return Entry(value, _ttl(ttl))

    async def head(self, key: str) -> Meta | None:
        """See ``Store.head``."""
        async with self._deadline():
            reply = await self._head_script(keys=[self._key(key)])
        if not isinstance(reply, list):
            self._expired_reads += int(reply)
            return None
        size, ttl = reply
        return Meta(int(size), _ttl(ttl))

    async def put(self, key: str, value: bytes, expire_in: int | None) -> bool:
        """See ``Store.put``."""
        lifetime = b"" if expire_in is None else str(expire_in).encode()
        async with self._deadline():
            existed = await self._put_script(
                keys=[self._key(key)], args=[lifetime, value]
            )
        return int(existed) == 0

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """See ``Store.put_many``: one script run, which Redis applies atomically."""
        lifetime = b"" if expire_in is None else str(expire_in).encode()
        keys = [self._key(key) for key in pairs]
        async with self._deadline():
            await self._put_script(keys=keys, args=[lifetime, *pairs.values()])

    async def delete(self, key: str) -> bool:
        """See ``Store.delete``."""
        async with self._deadline():
            removed = await self._redis.unlink(self._key(key))
        return int(removed) == 1

    async def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        """See ``Store.scan``.

        Each round trip pipelines the MGET of the previous SCAN page with the
        next SCAN, so a scan of N keys costs about N / ``scan_batch`` round
        trips, and only one page of values is held at a time.
        """
        match = self._match(glob)
        seen = SeenKeys()
        cursor: int | None = 0
        pending: list[bytes] = []
        prefix_length = len(self._prefix_bytes)
        while cursor is not None or pending:
            async with self._deadline():
                pipe = self._redis.pipeline(transaction=False)
                if pending:
                    pipe.mget(pending)
                if cursor is not None:
                    pipe.scan(cursor, match=match, count=self._scan_batch)
                replies = await pipe.execute()
            if pending:
                values = replies[0]
                batch = [
                    (key[prefix_length:].decode(), value)
                    for key, value in zip(pending, values, strict=True)
                    if value is not None
                ]
                if batch:
                    yield batch
            if cursor is not None:
                next_cursor, keys = replies[-1]
                pending = seen.new(keys)
                cursor = int(next_cursor) or None
            else:
                pending = []

    async def delete_matching(self, glob: str | None) -> int:
        """See ``Store.delete_matching``: SCAN pages removed with UNLINK."""
        match = self._match(glob)
        removed = 0
        cursor = 0
        while True:
            async with self._deadline():
                cursor, keys = await self._redis.scan(
                    cursor, match=match, count=self._scan_batch
                )
                if keys:
                    removed += int(await self._redis.unlink(*keys))
            if not cursor:
                return removed

    async def ping(self) -> None:
        """See ``Store.ping``."""
        async with self._deadline():
            await self._redis.ping()

    def pool_stats(self) -> PoolStats:
        """See ``Store.pool_stats``."""
        pool: Any = self._redis.connection_pool
        return PoolStats(
            in_use=len(pool._in_use_connections),
            idle=len(pool._available_connections),
            limit=int(pool.max_connections),
        )

    def expired_reads(self) -> int:
        """See ``Store.expired_reads``."""
        return self._expired_reads

    async def aclose(self) -> None:
        """See ``Store.aclose``."""
        await self._redis.aclose()

    def mark_reachable(self, reachable: bool) -> None:
        """Record whether Redis answered, logging each change once."""
        if reachable == self.reachable:
            return
        if reachable:
            log.info("redis %s", "connected" if self.reachable is None else "back")
        else:
            log.warning("redis lost")
        self.reachable = reachable


def connection_options(settings: Settings) -> dict[str, Any]:
    """Credentials and TLS options for the Redis connections of ``settings``.

    Keyword arguments for any redis-py connection or pool, whatever the
    topology. The user and password come from ``KVSTORE_REDIS_USERNAME``,
    ``KVSTORE_REDIS_PASSWORD`` or the first line of
    ``KVSTORE_REDIS_PASSWORD_FILE``; credentials in the URL are read by
    redis-py itself (settings refuse one given both ways). For a ``rediss://`` URL
    the server certificate is always verified, against the system's CAs and
    ``KVSTORE_REDIS_TLS_CA_FILE``, and its host name too unless
    ``KVSTORE_REDIS_TLS_VERIFY_HOSTNAME`` is false. The TLS files are loaded
    once here, so a wrong path or a key that does not fit its certificate
    stops the start instead of failing every connection. Raises
    ``SettingsError``; no message contains the password.
    """
    options: dict[str, Any] = {}
    if settings.redis_username is not None:
        options["username"] = settings.redis_username
    password = settings.redis_password
    if settings.redis_password_file is not None:
        password = _read_password(settings.redis_password_file)
    if password is not None:
        options["password"] = password
    if not (settings.redis_url or "").lower().startswith("rediss://"):
        return options
    tls: dict[str, Any] = {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": settings.redis_tls_verify_hostname,
    }
    if settings.redis_tls_ca_file is not None:
        tls["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None:
        tls["ssl_certfile"] = str(settings.redis_tls_cert_file)
    if settings.redis_tls_key_file is not None:
        tls["ssl_keyfile"] = str(settings.redis_tls_key_file)
    _check_tls_files(settings)
    return {**options, **tls}


def _read_password(path: Path) -> str:
    source = f"{env_name('redis_password_file')}={str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{source}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{source}: not UTF-8 text") from None
    # The first line, without its line break: files written by editors and
    # by ``echo`` end with one that is not part of the password.
    password = text.splitlines()[0] if text else ""
    if not password:
        raise SettingsError(f"{source}: the file is empty")
    return password


def _check_tls_files(settings: Settings) -> None:
    context = ssl.create_default_context()
    ca_file = settings.redis_tls_ca_file
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"{env_name('redis_tls_ca_file')}={str(ca_file)!r}: "
                f"cannot load it: {_reason(exc)}"
            ) from None
    cert_file = settings.redis_tls_cert_file
    if cert_file is not None:
        key_file = settings.redis_tls_key_file
        try:
            context.load_cert_chain(
                str(cert_file),
                None if key_file is None else str(key_file),
                password=_refuse_passphrase,
            )
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"{env_name('redis_tls_cert_file')}={str(cert_file)!r}, "
                f"{env_name('redis_tls_key_file')}="
                f"{None if key_file is None else str(key_file)!r}: "
                f"cannot load the certificate and key: {_reason(exc)} "
                "(the key must be an unencrypted PEM file that fits the certificate)"
            ) from None


def _refuse_passphrase() -> bytes:
    # Without this callback OpenSSL would prompt on the terminal for the
    # passphrase of an encrypted key; an empty one makes it fail instead.
    return b""


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return exc.strerror or str(exc)


class _Guard:
    """Bound a store call by a deadline and turn Redis failures into ours."""

    __slots__ = ("_store", "_timeout", "_timer")

    def __init__(self, store: RedisStore, timeout: float) -> None:
        self._store = store
        self._timeout = timeout

    async def __aenter__(self) -> None:
        self._timer = asyncio.timeout(self._timeout)
        await self._timer.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self._timer.__aexit__(exc_type, exc, traceback)
        except TimeoutError as timeout:
            self._store.mark_reachable(False)
            raise StoreTimeoutError("Redis did not answer in time") from timeout
        if exc is None:
            if self._store.reachable is not True:
                self._store.mark_reachable(True)
            return
        error = translate_error(exc)
        if error is None:
            return
        if isinstance(error, StoreUnavailableError | StoreTimeoutError):
            self._store.mark_reachable(False)
        raise error from exc


def translate_error(exc: BaseException) -> StoreError | None:
    """The store error for a Redis failure, or None for anything else.

    The single place where redis-py's exception classes become kvstore's;
    the error's ``kind`` says which failure it was.
    """
    error = _store_error(exc)
    if error is not None:
        error.kind = _error_kind(exc)
    return error


# Checked in order: the first class that matches names the kind.
_KINDS_BY_CLASS: tuple[tuple[type[BaseException], str], ...] = (
    (redis_errors.TimeoutError, "timeout"),
    (TimeoutError, "timeout"),
    (redis_errors.AuthenticationError, "auth"),
    (redis_errors.NoPermissionError, "auth"),
    (redis_errors.BusyLoadingError, "loading"),
    (redis_errors.ConnectionError, "connection"),
    (redis_errors.ReadOnlyError, "readonly"),
    (redis_errors.OutOfMemoryError, "oom"),
    (redis_errors.MasterDownError, "masterdown"),
    (redis_errors.TryAgainError, "tryagain"),
)


def _error_kind(exc: BaseException) -> str:
    for error_class, kind in _KINDS_BY_CLASS:
        if isinstance(exc, error_class):
            return kind
    if isinstance(exc, redis_errors.ResponseError):
        # Replies redis-py has no class for keep their code in the message.
        code = str(exc).split(" ", 1)[0].lower()
        return code if code in ERROR_KINDS else "response"
    return "other"


def _store_error(exc: BaseException) -> StoreError | None:
    if isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        return StoreTimeoutError("Redis did not answer in time")
    if isinstance(exc, redis_errors.ConnectionError):
        return StoreUnavailableError(f"Redis is unreachable: {type(exc).__name__}")
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(
        _UNAVAILABLE_REPLIES
    ):
        return StoreUnavailableError(f"Redis cannot serve: {str(exc).split()[0]}")
    if isinstance(exc, redis_errors.RedisError):
        return StoreError(f"Redis failed: {type(exc).__name__}")
    return None


class SeenKeys:
    """Remembers which scanned keys were already returned.

    SCAN may return a key more than once while Redis resizes its tables. Up
    to ``exact_limit`` keys are kept in a set; past that, keys are kept as
    64-bit hashes in an open-addressing table of about 16 bytes per key, so a
    scan of millions of keys stays within tens of megabytes. Two distinct keys
    share a 64-bit hash with odds of about n**2 / 2**65, about one in 37
    million for a million keys; the later one would be skipped.
    """

    def __init__(self, exact_limit: int = 65_536) -> None:
        self._exact: set[bytes] | None = set()
        self._exact_limit = exact_limit
        self._table = array("Q")
        self._mask = 0
        self._count = 0

    def new(self, keys: Sequence[bytes]) -> list[bytes]:
        """Return the keys not seen before, in order, and remember them."""
        if self._exact is not None:
            fresh = [key for key in dict.fromkeys(keys) if key not in self._exact]
            self._exact.update(fresh)
            if len(self._exact) > self._exact_limit:
                self._grow(len(self._exact) * 4)
                for key in self._exact:
                    self._add(key)
                self._exact = None
            return fresh
        if (self._count + len(keys)) * 2 > self._mask:
            self._grow((self._count + len(keys)) * 4)
        return [key for key in keys if self._add(key)]

    def _grow(self, size: int) -> None:
        capacity = 1 << max(size - 1, 1).bit_length()
        old = self._table
        self._table = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0
        for fingerprint in old:
            if fingerprint:
                self._insert(fingerprint)

    def _add(self, key: bytes) -> bool:
        return self._insert((hash(key) & 0xFFFFFFFFFFFFFFFF) or 1)

    def _insert(self, fingerprint: int) -> bool:
        table = self._table
        mask = self._mask
        slot = fingerprint & mask
        while True:
            current = table[slot]
            if current == fingerprint:
                return False
            if not current:
                table[slot] = fingerprint
                self._count += 1
                return True
            slot = (slot + 1) & mask


def _ttl(reply: Any) -> int | None:
    ttl = int(reply)
    return ttl if ttl >= 0 else None
