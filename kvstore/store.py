"""The store: the only code that talks to Redis.

Routes call a ``Store`` with service keys (no prefix) and JSON text as bytes;
the store adds the key prefix, bounds every call with one deadline and turns
Redis failures into its own errors::

    StoreError                 anything Redis refused that the client did not cause
    ├── StoreUnavailableError  no connection, or Redis cannot serve right now
    └── StoreTimeoutError      no answer within the deadline

``RedisStore`` serves a single Redis server through one connection pool;
``SentinelStore`` follows the primary that Redis Sentinel names; ``ClusterStore``
spreads keys over the primaries of a Redis Cluster. ``open_store`` picks one from
the settings, finding out at start whether the server is a cluster node. The
``Store`` protocol is what the HTTP layer relies on, so every topology stands
behind the same routes.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl
import uuid
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

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

# The same conditions where redis-py raises its own class and strips the
# reply's first word (out of memory, a replica refusing writes), and cluster
# errors that end once the cluster settles: a shard down or failing over
# (CLUSTERDOWN), slots without an owner, redirections that kept bouncing while
# slots moved ("TTL exhausted"), a multi-key call meeting a half-moved slot.
_UNAVAILABLE_ERRORS = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.ClusterError,
    redis_errors.SlotNotCoveredError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
)


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
    "cluster",
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

    With ``redis_wait_replicas`` set, each write is followed on the same
    connection by ``WAIT``; a write that fewer replicas confirmed in time
    raises ``StoreUnavailableError`` (it is applied on the primary, but not
    known to survive a failover).
    """

    # The Lua sources this store registers; a subclass may declare them
    # differently (``SentinelStore`` marks its reads as primary-only).
    get_source = GET_SCRIPT
    head_source = HEAD_SCRIPT
    put_source = PUT_SCRIPT

    def __init__(self, client: Any, settings: Settings) -> None:
        self._redis = client
        self._prefix = settings.key_prefix
        self._prefix_bytes = settings.key_prefix.encode()
        self._prefix_glob = escape_glob(settings.key_prefix)
        self._timeout = settings.redis_timeout
        self._scan_batch = settings.scan_batch
        self._get_script = client.register_script(self.get_source)
        self._head_script = client.register_script(self.head_source)
        self._put_script = client.register_script(self.put_source)
        self._wait_replicas = settings.redis_wait_replicas
        # WAIT gets half the deadline, leaving the rest for the write itself.
        self._wait_ms = max(1, int(settings.redis_timeout * 500))
        # Calls queue for a permit, first come first served, before they ask
        # the pool for a connection. The pool's own wait lets a newly arrived
        # call take a connection that was freed for a waiting one, so under
        # overload some calls waited until their deadline while later ones
        # went ahead; pools that fail rather than wait need the queue too.
        self._limit = asyncio.Semaphore(settings.redis_max_connections)
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
            existed = await self._write(
                self._put_script, [self._key(key)], [lifetime, value]
            )
        return int(existed) == 0

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """See ``Store.put_many``: one script run, which Redis applies atomically."""
        lifetime = b"" if expire_in is None else str(expire_in).encode()
        keys = [self._key(key) for key in pairs]
        async with self._deadline():
            await self._write(self._put_script, keys, [lifetime, *pairs.values()])

    async def _write(self, script: Any, keys: list[bytes], args: list[bytes]) -> Any:
        """Run a writing script, then ``WAIT`` for replicas when configured."""
        if not self._wait_replicas:
            return await script(keys=keys, args=args)
        # As a context manager, the pipeline gives its connection back even
        # when the deadline cancels it mid-reply.
        async with self._redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.wait(self._wait_replicas, self._wait_ms)
            reply, confirmed = await pipe.execute()
        self._check_replicas(confirmed)
        return reply

    def _check_replicas(self, confirmed: Any) -> None:
        if int(confirmed) < self._wait_replicas:
            raise StoreUnavailableError(
                f"the write reached {int(confirmed)} of {self._wait_replicas} "
                "replicas in time"
            )

    async def delete(self, key: str) -> bool:
        """See ``Store.delete``."""
        async with self._deadline():
            if self._wait_replicas:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.unlink(self._key(key))
                    pipe.wait(self._wait_replicas, self._wait_ms)
                    removed, confirmed = await pipe.execute()
                self._check_replicas(confirmed)
            else:
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
            async with (
                self._deadline(),
                self._redis.pipeline(transaction=False) as pipe,
            ):
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
                if keys and self._wait_replicas:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.unlink(*keys)
                        pipe.wait(self._wait_replicas, self._wait_ms)
                        unlinked, confirmed = await pipe.execute()
                    self._check_replicas(confirmed)
                    removed += int(unlinked)
                elif keys:
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

    __slots__ = ("_held", "_store", "_timeout", "_timer")

    def __init__(self, store: RedisStore, timeout: float) -> None:
        self._store = store
        self._timeout = timeout
        self._held: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        self._timer = asyncio.timeout(self._timeout)
        await self._timer.__aenter__()
        limit = self._store._limit
        try:
            await limit.acquire()
        except BaseException as exc:
            # The deadline may end the wait for a permit; turn that into the
            # same timeout error a slow reply would give.
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._held = limit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None
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


class _ClusterGuard(_Guard):
    """A ``_Guard`` that also covers a race inside redis-py's cluster client.

    When a cluster node reports CLUSTERDOWN, redis-py closes every connection
    of the client, including ones other calls are using at that moment; those
    calls then fail inside redis-py with ``AttributeError`` on the closed
    socket. That is the cluster being unavailable, not a bug of the caller.
    """

    __slots__ = ()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, AttributeError) and _raised_in_redis(exc):
            reset = redis_errors.ConnectionError("connection closed while in use")
            reset.__cause__ = exc
            exc_type, exc = type(reset), reset
        await super().__aexit__(exc_type, exc, traceback)


def _raised_in_redis(exc: BaseException) -> bool:
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "/redis/" in frame.tb_frame.f_code.co_filename


def translate_error(exc: BaseException) -> StoreError | None:
    """The store error for a Redis failure, or None for anything else.

    The single place where redis-py's exception classes become kvstore's;
    the error's ``kind`` says which failure it was. Cluster conditions a
    retry can outlive (a shard down or failing over, slots moving,
    redirections that did not settle) count as unavailable.
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
    (redis_errors.ClusterError, "cluster"),
    (redis_errors.AskError, "cluster"),
    (redis_errors.RedisClusterException, "cluster"),
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
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return StoreUnavailableError(f"Redis cannot serve: {type(exc).__name__}")
    if isinstance(exc, redis_errors.RedisClusterException):
        return StoreError(f"Redis Cluster failed: {type(exc).__name__}")
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


# Reads for a store that follows a primary through failovers. The shebang
# (Redis 7) declares the script as possibly writing, so a demoted primary
# refuses it with READONLY (and the client reconnects to the new primary)
# instead of answering from a replica's possibly older data; ``allow-oom``
# keeps reads working while the primary is out of memory.
PRIMARY_GET_SCRIPT = "#!lua flags=allow-oom" + GET_SCRIPT
PRIMARY_HEAD_SCRIPT = "#!lua flags=allow-oom" + HEAD_SCRIPT
# Declared writes are refused as a whole, before running, on a replica or
# when the server is out of memory.
PRIMARY_PUT_SCRIPT = "#!lua" + PUT_SCRIPT


class _Sentinels(Sentinel):
    """redis-py's ``Sentinel``, with discoveries of the primary taken in turn.

    Each discovery moves the sentinel that answered to the front of the
    list; two running at once swap by stale positions, which can drop a
    sentinel from the list (and leave its connections open). New connections
    are made one at a time during a failover anyway, each asking sentinels
    that answer in milliseconds.
    """

    def __init__(
        self, addresses: list[tuple[str, int]], options: dict[str, float]
    ) -> None:
        super().__init__(addresses, sentinel_kwargs=options)  # type: ignore[no-untyped-call]
        self._discovery = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        """See ``Sentinel.discover_master``; one discovery at a time."""
        async with self._discovery:
            return await super().discover_master(service_name)


class SentinelStore(RedisStore):
    """A ``Store`` on the primary that Redis Sentinel names, followed through failovers.

    Each new connection asks the sentinels for the current primary. When a
    failover demotes the primary, connections to it fail (or are refused as
    read-only, reads included) and are replaced by connections to the new
    one, so a request during a failover gets a store error (503) and the
    ones after it reach the new primary. What survives a failover is what
    Redis replicated before it: see ``redis_wait_replicas``.
    """

    get_source = PRIMARY_GET_SCRIPT
    head_source = PRIMARY_HEAD_SCRIPT
    put_source = PRIMARY_PUT_SCRIPT

    def __init__(self, client: Redis, settings: Settings, sentinel: Sentinel) -> None:
        super().__init__(client, settings)
        self._sentinel = sentinel

    @classmethod
    def from_settings(  # type: ignore[override]
        cls, settings: Settings
    ) -> "SentinelStore":
        """Create the store; nothing connects until first use.

        The sentinels come from ``redis_sentinels``. The data servers get the
        user name, password, database and TLS of ``redis_url`` when it is
        set, and the credentials and TLS files of the settings
        (``connection_options``). Raises ``SettingsError`` as that does.
        """
        if settings.redis_sentinel_service is None:
            raise ValueError("KVSTORE_REDIS_SENTINEL_SERVICE is not set")
        # A server that stops answering is the usual start of a failover.
        # Socket timeouts a little inside the call's deadline let redis-py
        # close such connections itself, which cancelling it mid-handshake
        # does not always do.
        inside = settings.redis_timeout * 0.8
        timeouts = {
            "socket_connect_timeout": min(settings.redis_connect_timeout, inside),
            "socket_timeout": inside,
        }
        sentinel = _Sentinels(settings.sentinel_addresses(), timeouts)
        client = sentinel.master_for(
            settings.redis_sentinel_service,
            max_connections=settings.redis_max_connections,
            retry=_retry(settings),
            socket_connect_timeout=timeouts["socket_connect_timeout"],
            socket_timeout=timeouts["socket_timeout"],
            **_from_url(settings.redis_url),
            **connection_options(settings),
        )
        return cls(client, settings, sentinel)

    async def aclose(self) -> None:
        """See ``Store.aclose``; the connections to the sentinels close too."""
        try:
            await self._redis.aclose()
        finally:
            await self._sentinel.aclose()


# Parks one hash slot's share of a bulk write in a hash beside its keys (same
# slot), to expire unless committed. KEYS[1] is the staging key; ARGV[1] its
# lifetime in milliseconds, then key, value, key, value...
STAGE_SCRIPT = """
for i = 2, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Applies a staged share atomically: KEYS[1] is the staging key, the keys
# follow; ARGV[1] is the lifetime in seconds or an empty string, ARGV[2] how
# long the "committed" marker left in place of the staging hash lives, so a
# repeated commit is recognised. Returns 1 when applied now, 0 when it was
# already, -1 when nothing is staged (it expired or was removed).
COMMIT_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return 0 end
if kind ~= 'hash' then return -1 end
local ttl = ARGV[1]
for i = 2, #KEYS do
    local value = redis.call('HGET', KEYS[1], KEYS[i])
    if ttl == '' then
        redis.call('SET', KEYS[i], value)
    else
        redis.call('SET', KEYS[i], value, 'EX', ttl)
    end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return 1
"""

# Staging keys sit under the key prefix (so per-prefix cleanup finds them)
# behind a control character, which no service key may contain; reads and
# deletes of service keys skip them.
_INTERNAL_MARK = b"\x00"

# Full reads walk the primaries again while slots are moving (each pass
# sends only keys not seen before); past this many passes they give up.
_MAX_SCAN_PASSES = 5


class ClusterStore(RedisStore):
    """A ``Store`` on a Redis Cluster: keys spread over the primaries by hash slot.

    Single-key calls go to the key's primary; redis-py follows ``MOVED`` and
    ``ASK`` redirections within the call's deadline. A call that meets a
    failed node gets a 503 and the next call reloads the slot map, so the
    store follows failovers without a restart. Full and wildcard reads and
    ``DELETE /keys`` walk every primary, sources of a slot migration before
    their targets, and walk again if slots moved meanwhile, so a key present
    throughout is never missed and never sent twice.

    A bulk write whose keys share one slot is one atomic script, as on a
    single server. Otherwise it is staged on every slot first and committed
    only once every slot holds its share: a shard that cannot take its part
    (down, failing over, out of memory) leaves no key written anywhere. The
    commit is atomic per slot and retried until the deadline; a shard lost
    between staging and commit can leave the write partly applied, which is
    logged. Readers may see some slots committed before others.

    ``redis_wait_replicas`` is refused: ``WAIT`` belongs to one connection,
    and a redirected write would leave it waiting on the wrong node.
    """

    def __init__(self, client: RedisCluster, settings: Settings) -> None:
        if settings.redis_wait_replicas:
            raise SettingsError(
                f"KVSTORE_REDIS_WAIT_REPLICAS={settings.redis_wait_replicas}: "
                "not supported on a Redis Cluster"
            )
        prefix = settings.key_prefix.encode()
        if _hash_tag(prefix) is None and b"{" in prefix:
            raise SettingsError(
                f"KVSTORE_KEY_PREFIX={settings.key_prefix!r}: on a Redis Cluster a "
                "prefix may hold '{' only as a whole hash tag such as '{app}'"
            )
        super().__init__(client, settings)
        self._cluster: RedisCluster = client
        self._per_node_limit = settings.redis_max_connections
        self._stage_ms = int(settings.redis_timeout * 2000) + 1000
        self._stage_script = client.register_script(STAGE_SCRIPT)
        self._commit_script = client.register_script(COMMIT_SCRIPT)
        self._tags = slot_tags()

    @classmethod
    def from_settings(cls, settings: Settings, url: str) -> "ClusterStore":
        """Create the store from any node's URL; nothing connects until first use.

        ``redis_max_connections`` bounds the connections to each node and the
        calls in flight at once.
        """
        client = RedisCluster.from_url(
            url,
            **connection_options(settings),
            max_connections=settings.redis_max_connections,
            socket_connect_timeout=settings.redis_connect_timeout,
            # The call's deadline bounds every read; a socket timeout as well
            # would cost a timer per reply.
            socket_timeout=None,
            # redis-py's cluster retries (and its full reload every few MOVED
            # replies) close every connection, those other calls are using
            # included. Without them a failed call reports 503 and marks
            # the layout for reloading, which the next call does; a MOVED
            # reply still updates the slot map in place.
            retry=Retry(NoBackoff(), 0),
            reinitialize_steps=0,
        )
        return cls(client, settings)

    def _deadline(self) -> "_Guard":
        return _ClusterGuard(self, self._timeout)

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """See ``Store.put_many`` and the class notes on staging."""
        lifetime = b"" if expire_in is None else str(expire_in).encode()
        groups: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in pairs.items():
            full_key = self._key(key)
            groups.setdefault(key_slot(full_key), []).append((full_key, value))
        if len(groups) == 1:
            (group,) = groups.values()
            async with self._deadline():
                await self._put_script(
                    keys=[key for key, _ in group],
                    args=[lifetime, *(value for _, value in group)],
                )
            return
        batch = uuid.uuid4().hex.encode()
        stages = {slot: self._stage_key(slot, batch) for slot in groups}
        progress = _BulkProgress()
        try:
            async with self._deadline():
                await self._stage(groups, stages)
                progress.committing = True
                await self._commit(groups, stages, lifetime, progress.committed)
        except StoreError:
            if not progress.committing:
                await self._discard(list(stages.values()))
            else:
                # A commit whose reply was lost may have applied too, so the
                # count is a lower bound.
                log.exception(
                    "bulk write partly applied",
                    extra={
                        "slots_written": len(progress.committed),
                        "slots": len(groups),
                    },
                )
            raise

    def _stage_key(self, slot: int, batch: bytes) -> bytes:
        if _hash_tag(self._prefix_bytes) is not None:
            # The prefix's own tag puts every key in one slot; bulk writes
            # then never need staging, so this key is never used.
            return self._prefix_bytes + _INTERNAL_MARK + batch
        return (
            self._prefix_bytes + _INTERNAL_MARK + b"{" + self._tags[slot] + b"}" + batch
        )

    async def _stage(
        self,
        groups: dict[int, list[tuple[bytes, bytes]]],
        stages: dict[int, bytes],
    ) -> None:
        calls = []
        for slot, group in groups.items():
            args = [str(self._stage_ms).encode()]
            for key, value in group:
                args += (key, value)
            calls.append(([stages[slot]], args))
        for reply in await self._run_each(self._stage_script, calls):
            if isinstance(reply, Exception):
                raise reply

    async def _commit(
        self,
        groups: dict[int, list[tuple[bytes, bytes]]],
        stages: dict[int, bytes],
        lifetime: bytes,
        committed: set[int],
    ) -> None:
        marker_ms = str(self._stage_ms).encode()
        pending = list(groups)
        delay = 0.01
        while pending:
            calls = [
                (
                    [stages[slot], *(key for key, _ in groups[slot])],
                    [lifetime, marker_ms],
                )
                for slot in pending
            ]
            try:
                replies = await self._run_each(self._commit_script, calls)
            except redis_errors.RedisError as exc:
                replies = [exc] * len(pending)
            retry: list[int] = []
            for slot, reply in zip(pending, replies, strict=True):
                if isinstance(reply, Exception):
                    if not isinstance(translate_error(reply), StoreUnavailableError):
                        raise reply
                    retry.append(slot)
                elif int(reply) < 0:
                    raise StoreError("a staged bulk write expired before its commit")
                else:
                    committed.add(slot)
            pending = retry
            if pending:
                # Keep trying until the deadline: the rest is staged and only
                # waits for its shard to answer again.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    async def _discard(self, stages: list[bytes]) -> None:
        # Staged shares expire by themselves; removing them now only frees
        # memory sooner, so a failure here changes nothing for the caller.
        with contextlib.suppress(StoreError):
            async with self._deadline():
                pipe = self._cluster.pipeline()
                for stage in stages:
                    pipe.execute_command("UNLINK", stage)
                await pipe.execute(raise_on_error=False)

    async def _run_each(
        self, script: Any, calls: list[tuple[list[bytes], list[bytes]]]
    ) -> list[Any]:
        """Run ``script`` once per (keys, args): one pipelined round trip per node.

        Returns the replies in order, failures as exceptions. A node that
        lacks the script (a new primary) gets it loaded, then a second try.
        """
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self._cluster.pipeline()
            for index in todo:
                keys, args = calls[index]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            missing = []
            for index, result in zip(todo, results, strict=True):
                replies[index] = result
                if isinstance(result, redis_errors.NoScriptError):
                    missing.append(index)
            if not missing or attempt:
                break
            await self._cluster.script_load(script.script)
            todo = missing
        return replies

    async def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        """See ``Store.scan``: every primary, values fetched with MGET per slot."""
        prefix_length = len(self._prefix_bytes)
        async for keys in self._key_pages(self._match(glob)):
            by_slot: dict[int, list[bytes]] = {}
            for key in keys:
                by_slot.setdefault(key_slot(key), []).append(key)
            async with self._deadline():
                pipe = self._cluster.pipeline()
                for slot_keys in by_slot.values():
                    pipe.execute_command("MGET", *slot_keys)
                replies = await pipe.execute()
            batch = [
                (key[prefix_length:].decode(), value)
                for slot_keys, values in zip(by_slot.values(), replies, strict=True)
                for key, value in zip(slot_keys, values, strict=True)
                if value is not None
            ]
            if batch:
                yield batch

    async def delete_matching(self, glob: str | None) -> int:
        """See ``Store.delete_matching``: every primary, UNLINK per slot."""
        removed = 0
        async for keys in self._key_pages(self._match(glob)):
            by_slot: dict[int, list[bytes]] = {}
            for key in keys:
                by_slot.setdefault(key_slot(key), []).append(key)
            async with self._deadline():
                pipe = self._cluster.pipeline()
                for slot_keys in by_slot.values():
                    pipe.execute_command("UNLINK", *slot_keys)
                removed += sum(int(count) for count in await pipe.execute())
        return removed

    async def _key_pages(self, match: str) -> AsyncIterator[list[bytes]]:
        """Pages of keys matching ``match`` on every primary, each key once.

        A pass walks the primaries with SCAN, sources of migrating slots
        before their targets: a key moving during the pass is either still on
        the source when the source is walked or already on the target when
        the target is. When the layout changed during a pass (a migration
        began or ended, a failover), another pass catches keys that moved
        across. Staging keys are left out.
        """
        seen = SeenKeys()
        async with self._deadline():
            layout = await self._layout()
        for _ in range(_MAX_SCAN_PASSES):
            for node in layout.scan_order:
                cursor = 0
                while True:
                    async with self._deadline():
                        pipe = self._cluster.pipeline()
                        pipe.execute_command(
                            "SCAN",
                            cursor,
                            "MATCH",
                            match,
                            "COUNT",
                            self._scan_batch,
                            target_nodes=node,
                        )
                        ((cursor, keys),) = await pipe.execute()
                    fresh = seen.new(
                        [key for key in keys if not self._is_internal(key)]
                    )
                    if fresh:
                        yield fresh
                    if not int(cursor):
                        break
            async with self._deadline():
                after = await self._layout()
            if after.fingerprint == layout.fingerprint:
                return
            layout = after
        raise StoreUnavailableError("Redis Cluster slots kept moving during the read")

    def _is_internal(self, key: bytes) -> bool:
        return key[len(self._prefix_bytes) : len(self._prefix_bytes) + 1] == (
            _INTERNAL_MARK
        )

    async def _layout(self) -> "_Layout":
        """Who owns which slots, and which slots are moving, as the primaries say."""
        primaries, selves = await self._primaries_view()
        if primaries is None:
            # A failover made the client's list of primaries stale; reload it.
            await self._cluster.nodes_manager.initialize()
            primaries, selves = await self._primaries_view()
        if primaries is None:
            raise StoreUnavailableError("Redis Cluster is changing primaries")
        entries: list[tuple[str, str, tuple[str, ...]]] = []
        sources: set[str] = set()
        targets: set[str] = set()
        for node, me in zip(primaries, selves, strict=True):
            slots = tuple("-".join(map(str, entry)) for entry in me["slots"])
            moves = tuple(
                f"{move['slot']}:{move['state']}:{move['node_id']}"
                for move in me["migrations"]
            )
            entries.append((me["node_id"], me["epoch"], slots + moves))
            for move in me["migrations"]:
                (sources if move["state"] == "migrating" else targets).add(node.name)
        order = sorted(
            primaries,
            key=lambda node: (node.name in targets, node.name not in sources),
        )
        return _Layout(tuple(sorted(entries)), order)

    async def _primaries_view(self) -> tuple[list[Any] | None, list[dict[str, Any]]]:
        """The primaries the client knows and each one's own CLUSTER NODES line.

        The list is None when one of them no longer is a primary.
        """
        primaries = self._cluster.get_primaries()
        replies = await asyncio.gather(
            *(
                self._cluster.execute_command("CLUSTER NODES", target_nodes=node)
                for node in primaries
            )
        )
        selves: list[dict[str, Any]] = []
        for reply in replies:
            me = next((e for e in reply.values() if "myself" in e["flags"]), None)
            if me is None or "master" not in me["flags"]:
                return None, []
            selves.append(me)
        return primaries, selves

    async def ping(self) -> None:
        """See ``Store.ping``: every primary must answer."""
        async with self._deadline():
            await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES)

    def pool_stats(self) -> PoolStats:
        """See ``Store.pool_stats``: the busiest node's pool.

        Each node has a pool of up to ``redis_max_connections``; the node with
        the most connections in use is the one closest to running out, so its
        figures stand for the store.
        """
        busiest = PoolStats(in_use=0, idle=0, limit=self._per_node_limit)
        for node in self._cluster.get_nodes():
            idle = len(node._free)
            in_use = len(node._connections) - idle
            if (in_use, idle) > (busiest.in_use, busiest.idle):
                busiest = PoolStats(in_use, idle, self._per_node_limit)
        return busiest


@dataclasses.dataclass(slots=True)
class _BulkProgress:
    """How far a staged bulk write got: committing yet, and which slots are done."""

    committing: bool = False
    committed: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """The slot layout as the primaries report it, and the order to scan them in."""

    fingerprint: tuple[tuple[str, str, tuple[str, ...]], ...]
    scan_order: list[Any]


def _hash_tag(key: bytes) -> bytes | None:
    """The part of ``key`` Redis Cluster hashes, when it has a hash tag."""
    opening = key.find(b"{")
    if opening < 0:
        return None
    closing = key.find(b"}", opening + 1)
    if closing <= opening + 1:
        return None
    return key[opening + 1 : closing]


@functools.cache
def slot_tags() -> tuple[bytes, ...]:
    """For each cluster hash slot, a short hash tag that lands in it.

    Found by counting in hexadecimal until every slot is hit, about 160,000
    CRC16 sums, once per process.
    """
    tags: list[bytes] = [b""] * REDIS_CLUSTER_HASH_SLOTS
    missing = REDIS_CLUSTER_HASH_SLOTS
    number = 0
    while missing:
        tag = b"%x" % number
        slot = key_slot(tag)
        if not tags[slot]:
            tags[slot] = tag
            missing -= 1
        number += 1
    return tuple(tags)


def _retry(settings: Settings) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(base=0.01, cap=0.25),
        settings.redis_retries,
        supported_errors=(redis_errors.ConnectionError,),
    )


def _from_url(url: str | None) -> dict[str, Any]:
    """What a Redis URL says beyond the address: credentials, database, TLS.

    For servers found otherwise, such as the primary that sentinels name.
    """
    if url is None:
        return {}
    options = parse_url(url)
    chosen = {
        name: options[name]
        for name in ("username", "password", "db")
        if options.get(name) is not None
    }
    if url.lower().startswith("rediss://"):
        chosen["ssl"] = True
    return chosen


class PendingStore:
    """A ``Store`` for a Redis that could not be reached when serving started.

    Whether it is a cluster node is found out on the first call that reaches
    it; until then every call fails with ``StoreUnavailableError`` (503), as
    it would on any store while Redis is down.
    """

    def __init__(self, settings: Settings, url: str) -> None:
        self._settings = settings
        self._url = url
        self._store: RedisStore | None = None
        self._lock = asyncio.Lock()

    @property
    def reachable(self) -> bool | None:
        """Whether Redis answered the last call; False until it first does."""
        return False if self._store is None else self._store.reachable

    async def _resolve(self) -> RedisStore:
        if self._store is None:
            async with self._lock:
                if self._store is None:
                    self._store = await _open_by_url(self._settings, self._url)
                    log.info(
                        "redis topology found",
                        extra={"store": type(self._store).__name__},
                    )
        return self._store

    async def get(self, key: str) -> Entry | None:
        """See ``Store.get``."""
        return await (await self._resolve()).get(key)

    async def head(self, key: str) -> Meta | None:
        """See ``Store.head``."""
        return await (await self._resolve()).head(key)

    async def put(self, key: str, value: bytes, expire_in: int | None) -> bool:
        """See ``Store.put``."""
        return await (await self._resolve()).put(key, value, expire_in)

    async def put_many(self, pairs: Mapping[str, bytes], expire_in: int | None) -> None:
        """See ``Store.put_many``."""
        await (await self._resolve()).put_many(pairs, expire_in)

    async def delete(self, key: str) -> bool:
        """See ``Store.delete``."""
        return await (await self._resolve()).delete(key)

    async def scan(self, glob: str | None) -> AsyncIterator[list[tuple[str, bytes]]]:
        """See ``Store.scan``."""
        store = await self._resolve()
        async for batch in store.scan(glob):
            yield batch

    async def delete_matching(self, glob: str | None) -> int:
        """See ``Store.delete_matching``."""
        return await (await self._resolve()).delete_matching(glob)

    async def ping(self) -> None:
        """See ``Store.ping``."""
        await (await self._resolve()).ping()

    def pool_stats(self) -> PoolStats:
        """See ``Store.pool_stats``: an empty pool until Redis is found."""
        if self._store is None:
            return PoolStats(0, 0, self._settings.redis_max_connections)
        return self._store.pool_stats()

    def expired_reads(self) -> int:
        """See ``Store.expired_reads``."""
        return 0 if self._store is None else self._store.expired_reads()

    async def aclose(self) -> None:
        """See ``Store.aclose``."""
        if self._store is not None:
            await self._store.aclose()


async def is_cluster_node(settings: Settings, url: str) -> bool:
    """Whether the server at ``url`` runs in cluster mode (``INFO cluster``).

    Raises ``StoreError`` when it cannot be asked within ``redis_timeout``. A
    server that refuses ``INFO`` (an ACL user without it, a renamed command)
    is taken for a single server, with a warning: cluster support needs the
    command.
    """
    client = Redis.from_url(
        url,
        socket_connect_timeout=settings.redis_connect_timeout,
        **connection_options(settings),
    )
    try:
        async with asyncio.timeout(settings.redis_timeout):
            info = await client.info("cluster")
    except (TimeoutError, redis_errors.RedisError) as exc:
        error = translate_error(exc) or StoreError("Redis failed")
        if isinstance(error, StoreUnavailableError | StoreTimeoutError):
            raise error from exc
        log.warning(
            "redis refused INFO (%s); serving it as a single server, "
            "not a cluster node",
            type(exc).__name__,
        )
        return False
    finally:
        await client.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def _open_by_url(settings: Settings, url: str) -> RedisStore:
    if await is_cluster_node(settings, url):
        return ClusterStore.from_settings(settings, url)
    return RedisStore.from_settings(settings, url)


async def open_store(settings: Settings) -> Store:
    """The store the settings describe, for a serving app to own and close.

    Sentinel settings give a ``SentinelStore``. Otherwise the server at
    ``redis_url`` is asked once whether it is a cluster node, giving a
    ``ClusterStore`` or a ``RedisStore``; when it cannot be reached, a
    ``PendingStore`` asks again on first use, so the service starts (and
    reports not ready) while Redis is down. Raises ``SettingsError`` for
    settings the topology cannot honour, ``ValueError`` without a Redis URL
    or sentinels.
    """
    if settings.redis_sentinels is not None:
        return SentinelStore.from_settings(settings)
    if settings.redis_url is None:
        raise ValueError("KVSTORE_REDIS_URL is not set")
    try:
        return await _open_by_url(settings, settings.redis_url)
    except (StoreUnavailableError, StoreTimeoutError) as exc:
        log.warning(
            "redis unreachable at start; its topology is found on first use: %s", exc
        )
        return PendingStore(settings, settings.redis_url)
