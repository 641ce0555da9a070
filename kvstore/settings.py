"""Settings read from ``KVSTORE_*`` environment variables.

Every setting has a default that works on a laptop, so ``kvstore serve`` runs
with no environment at all. ``Settings.from_env`` takes the mapping to read
from, which keeps tests free of ``os.environ`` patching.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

LOG_FORMATS = ("json", "text")
SERVERS = ("hypercorn", "uvicorn")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """A ``KVSTORE_*`` variable holds a value the service cannot use."""


def _parse_int(text: str) -> int:
    return int(text.replace("_", ""))


def _parse_float(text: str) -> float:
    return float(text)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_str(text: str) -> str:
    return text


def _parse_optional_str(text: str) -> str | None:
    return text or None


def _parse_path(text: str) -> Path:
    return Path(text).expanduser()


def _parse_optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


PARSERS: dict[Any, Callable[[str], Any]] = {
    int: _parse_int,
    float: _parse_float,
    bool: _parse_bool,
    str: _parse_str,
    str | None: _parse_optional_str,
    Path: _parse_path,
    Path | None: _parse_optional_path,
    tuple[str, ...]: _parse_list,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration of one kvstore process.

    Field ``name`` is read from ``KVSTORE_NAME``. ``redis_url`` left unset means
    "start an embedded Redis server" when serving from the command line.

    ``redis_sentinels`` (``host:port,host:port``) with ``redis_sentinel_service``
    makes the service follow the primary those sentinels name; ``redis_url``
    then only contributes credentials and the database number, if given.
    ``redis_wait_replicas`` above zero makes every write wait (Redis ``WAIT``)
    until that many replicas hold it, within ``redis_timeout``.
    """

    bind: str = "127.0.0.1:5000"
    workers: int = 1
    server: str = "hypercorn"
    redis_url: str | None = None
    data_dir: Path = Path("./data")
    key_prefix: str = "kvstore:"
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_pairs: int = 10_000
    max_header_bytes: int = 16 * 1024
    max_expire_in: int = 10 * 365 * 24 * 3600
    max_filter_wildcards: int = 8
    redis_max_connections: int = 64
    redis_connect_timeout: float = 2.0
    redis_timeout: float = 2.0
    redis_retries: int = 2
    redis_sentinels: str | None = None
    redis_sentinel_service: str | None = None
    redis_wait_replicas: int = 0
    scan_batch: int = 1000
    retry_after: int = 1
    log_format: str = "json"
    log_level: str = "INFO"
    access_log: bool = True
    shutdown_timeout: float = 10.0
    body_timeout: float = 30.0
    metrics_bind: str | None = None
    metrics_dir: Path | None = None
    # Access control and transport security; see kvstore/auth.py, kvstore/cors.py
    # and ``connection_options`` in kvstore/store.py. Secrets stay out of repr().
    api_tokens: str | None = dataclasses.field(default=None, repr=False)
    api_tokens_file: Path | None = None
    auth_probes: bool = False
    auth_metrics: bool = True
    auth_docs: bool = False
    cors_origins: tuple[str, ...] = ()
    cors_max_age: int = 600
    redis_username: str | None = None
    redis_password: str | None = dataclasses.field(default=None, repr=False)
    redis_password_file: Path | None = None
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    redis_tls_verify_hostname: bool = True

    def __post_init__(self) -> None:
        positive = (
            "workers",
            "max_key_bytes",
            "max_value_bytes",
            "max_body_bytes",
            "max_pairs",
            "max_header_bytes",
            "max_expire_in",
            "max_filter_wildcards",
            "redis_max_connections",
            "scan_batch",
            "retry_after",
        )
        for name in positive:
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be at least 1")
        for name in (
            "redis_connect_timeout",
            "redis_timeout",
            "shutdown_timeout",
            "body_timeout",
        ):
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be above zero")
        if self.redis_retries < 0:
            _fail("redis_retries", self.redis_retries, "must not be negative")
        if self.redis_wait_replicas < 0:
            _fail(
                "redis_wait_replicas", self.redis_wait_replicas, "must not be negative"
            )
        if (self.redis_sentinels is None) != (self.redis_sentinel_service is None):
            _fail(
                "redis_sentinels",
                self.redis_sentinels,
                "must be set together with KVSTORE_REDIS_SENTINEL_SERVICE",
            )
        self.sentinel_addresses()
        if self.server not in SERVERS:
            _fail("server", self.server, f"must be one of {SERVERS}")
        if self.log_format not in LOG_FORMATS:
            _fail("log_format", self.log_format, f"must be one of {LOG_FORMATS}")
        if self.log_level not in LOG_LEVELS:
            _fail("log_level", self.log_level, f"must be one of {LOG_LEVELS}")
        if not self.key_prefix:
            _fail("key_prefix", self.key_prefix, "must not be empty")
        if self.bind.rpartition(":")[0] == "" and not self.bind.startswith("unix:"):
            _fail("bind", self.bind, "must be HOST:PORT or unix:PATH")
        if self.metrics_bind is not None:
            _check_metrics_bind(self.metrics_bind, self.bind)
            if self.server != "hypercorn":
                # uvicorn listens on one address only.
                _fail(
                    "metrics_bind", self.metrics_bind, "needs KVSTORE_SERVER=hypercorn"
                )
        if self.metrics_dir is not None and len(str(self.metrics_dir)) > 80:
            # Workers listen on unix sockets inside it, whose paths are short.
            _fail("metrics_dir", str(self.metrics_dir), "must be at most 80 characters")
        self._check_security()

    def _check_security(self) -> None:
        if self.cors_max_age < 0:
            _fail("cors_max_age", self.cors_max_age, "must not be negative")
        for origin in self.cors_origins:
            reason = _origin_problem(origin, len(self.cors_origins))
            if reason:
                _fail("cors_origins", ",".join(self.cors_origins), reason)
        credentials = ("redis_username", "redis_password", "redis_password_file")
        if self.redis_url is None:
            for name in credentials:
                if getattr(self, name) is not None:
                    _fail_unshown(
                        name, "needs KVSTORE_REDIS_URL: the embedded Redis has no users"
                    )
        if self.redis_password is not None and self.redis_password_file is not None:
            _fail_unshown(
                "redis_password_file", "set it or KVSTORE_REDIS_PASSWORD, not both"
            )
        in_url = urlsplit(self.redis_url or "")
        if in_url.username and self.redis_username is not None:
            _fail_unshown("redis_username", "the Redis URL names a user already")
        if in_url.password and (
            self.redis_password is not None or self.redis_password_file is not None
        ):
            _fail_unshown("redis_password", "the Redis URL has a password already")
        tls = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
        secure_url = (self.redis_url or "").lower().startswith("rediss://")
        for name in tls:
            if getattr(self, name) is not None and not secure_url:
                _fail(
                    name,
                    str(getattr(self, name)),
                    "needs a rediss:// KVSTORE_REDIS_URL",
                )
        if self.redis_tls_key_file is not None and self.redis_tls_cert_file is None:
            _fail(
                "redis_tls_key_file",
                str(self.redis_tls_key_file),
                "needs KVSTORE_REDIS_TLS_CERT_FILE too",
            )

    def tokens_configured(self) -> bool:
        """True when API tokens are set, so every request must bring one."""
        return bool(self.api_tokens) or self.api_tokens_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``KVSTORE_*`` variables in ``environ``.

        ``environ`` defaults to ``os.environ``. Unset or empty variables keep
        their defaults. Raises ``SettingsError`` naming the variable and value
        when one cannot be parsed or is out of range.
        """
        if environ is None:
            environ = os.environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = env_name(field.name)
            text = environ.get(variable, "").strip()
            if not text:
                continue
            parser = PARSERS[field.type]
            try:
                values[field.name] = parser(text)
            except ValueError as exc:
                raise SettingsError(f"{variable}={text!r}: {exc}") from None
        return cls(**values)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs of ``redis_sentinels``; empty when unset.

        Raises ``SettingsError`` for an entry that is not ``host:port``.
        """
        if self.redis_sentinels is None:
            return []
        addresses: list[tuple[str, int]] = []
        for entry in self.redis_sentinels.split(","):
            host, _, port = entry.strip().rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                _fail("redis_sentinels", self.redis_sentinels, "expected host:port,...")
            addresses.append((host, int(port)))
        return addresses

    def public(self) -> dict[str, Any]:
        """The settings as plain values, with credentials in URLs masked."""
        shown = {
            field.name: getattr(self, field.name) for field in dataclasses.fields(self)
        }
        shown["data_dir"] = str(self.data_dir)
        shown["metrics_dir"] = (
            None if self.metrics_dir is None else str(self.metrics_dir)
        )
        shown["redis_url"] = mask_url(self.redis_url)
        for name in ("api_tokens", "redis_password"):
            shown[name] = None if shown[name] is None else "***"
        for name, value in shown.items():
            if isinstance(value, Path):
                shown[name] = str(value)
        shown["cors_origins"] = list(self.cors_origins)
        return shown


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return f"KVSTORE_{field_name.upper()}"


def mask_url(url: str | None) -> str | None:
    """Hide the password (and user) of a ``scheme://user:pass@host`` URL."""
    if url is None or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    credentials, _, location = rest.rpartition("@")
    if not sep or not credentials:
        return url
    return f"{scheme}://***@{location}"


def tcp_port(bind: str) -> int | None:
    """The port of a ``HOST:PORT`` bind, or None for ``unix:PATH`` or no port."""
    if bind.startswith("unix:"):
        return None
    _, _, port = bind.rpartition(":")
    return int(port) if port.isdigit() else None


def _check_metrics_bind(metrics_bind: str, bind: str) -> None:
    # Requests are told apart by the port they arrived on, so the metrics
    # listener needs a TCP port of its own.
    port = tcp_port(metrics_bind)
    if port is None or not 0 < port < 65536 or not metrics_bind.rpartition(":")[0]:
        _fail("metrics_bind", metrics_bind, "must be HOST:PORT")
    if port == tcp_port(bind):
        _fail("metrics_bind", metrics_bind, "must use another port than KVSTORE_BIND")


def _fail(name: str, value: object, reason: str) -> None:
    raise SettingsError(f"{env_name(name)}={value!r}: {reason}")


def _fail_unshown(name: str, reason: str) -> None:
    """Like ``_fail``, for settings whose value may be a secret."""
    raise SettingsError(f"{env_name(name)}: {reason}")


def _origin_problem(origin: str, count: int) -> str | None:
    """Why ``origin`` cannot be a CORS origin, or None when it can."""
    if origin == "*":
        return None if count == 1 else "'*' must be the only origin"
    scheme, separator, host = origin.partition("://")
    if scheme not in ("http", "https") or not separator:
        return f"{origin!r} is not an origin: expected http(s)://HOST[:PORT]"
    if not host or any(char in host for char in "/?#@ ") or host.endswith(":"):
        return f"{origin!r} is not an origin: expected http(s)://HOST[:PORT], no path"
    if origin != origin.lower():
        return f"{origin!r}: write origins in lower case, as browsers send them"
    return None
