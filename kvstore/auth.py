"""Bearer-token access control for the HTTP API.

Tokens come from ``KVSTORE_API_TOKENS`` (entries separated by commas or
whitespace) and from the file named by ``KVSTORE_API_TOKENS_FILE`` (one entry
a line; ``#`` starts a comment). Each entry is ``ROLE:TOKEN``:

* ``ro:TOKEN`` may read: ``GET`` and ``HEAD``;
* ``rw:TOKEN`` may also write: ``PUT`` and ``DELETE``.

A token is at least 16 characters of the bearer-token alphabet (letters,
digits and ``-._~+/``, optionally ending in ``=``), such as the output of
``python -c 'import secrets; print(secrets.token_urlsafe(32))'``.

With no token configured the API is open and nothing runs per request; the
service logs a warning when it starts serving. With tokens, every request but
``OPTIONS`` (CORS preflights carry no credentials) and the paths left open by
``KVSTORE_AUTH_PROBES``, ``KVSTORE_AUTH_METRICS`` and ``KVSTORE_AUTH_DOCS``
must send ``Authorization: Bearer TOKEN``. Tokens are held only as SHA-256
digests, and a presented token is compared with every one of them in constant
time, so response timing tells nothing about how close a guess came or which
entry matched. Tokens are never logged, and errors about them name the
variable and entry, never the text.
"""

import enum
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

from hypercorn.typing import HTTPScope
from quart import Quart, request

from kvstore.errors import ForbiddenError, UnauthorizedError
from kvstore.settings import Settings, SettingsError, env_name

log = logging.getLogger(__name__)

REALM = "kvstore"
MIN_TOKEN_LENGTH = 16
READ_METHODS = frozenset({"GET", "HEAD"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/openapi.json", "/docs"})
# The Swagger UI page's scripts and styles.
DOCS_PREFIXES = ("/docs/static/",)

# RFC 6750's b64token: what a client can send after "Bearer " unquoted.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

CHALLENGE = f'Bearer realm="{REALM}"'
INVALID_TOKEN_CHALLENGE = f'{CHALLENGE}, error="invalid_token"'
READ_ONLY_CHALLENGE = f'{CHALLENGE}, error="insufficient_scope", scope="rw"'


class Role(enum.Enum):
    """What a token allows: reading only, or reading and writing."""

    READ = "ro"
    WRITE = "rw"


class Tokens:
    """The configured tokens and their roles, kept as SHA-256 digests.

    ``role`` hashes the presented token and compares the digest with every
    configured one, never stopping early, so its running time depends only
    on how many tokens there are.
    """

    __slots__ = ("_entries",)

    def __init__(self, roles: Mapping[str, Role]) -> None:
        self._entries = tuple((_digest(token), role) for token, role in roles.items())

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, role: Role) -> int:
        """How many tokens have ``role``."""
        return sum(1 for _, entry_role in self._entries if entry_role is role)

    def role(self, token: str | bytes) -> Role | None:
        """The role of ``token``, or None when it is not a configured token."""
        digest = _digest(token)
        found: Role | None = None
        for candidate, role in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = role
        return found


def _digest(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode()
    return hashlib.sha256(token).digest()


def parse_tokens(entries: Iterable[tuple[str, str]]) -> dict[str, Role]:
    """Parse ``(where, entry)`` pairs of ``ROLE:TOKEN`` into a token table.

    ``where`` names the entry's source (variable and position) for errors.
    Raises ``SettingsError`` for a bad role, a malformed or short token, or
    a token listed twice; the message never contains the entry's text.
    """
    roles: dict[str, Role] = {}
    for where, entry in entries:
        prefix, separator, token = entry.partition(":")
        try:
            role = Role(prefix)
        except ValueError:
            role = None
        if not separator or role is None:
            raise SettingsError(f"{where}: expected ro:TOKEN or rw:TOKEN")
        if not _TOKEN_SHAPE.fullmatch(token):
            raise SettingsError(
                f"{where}: a token may hold only letters, digits and -._~+/ "
                "(and end in =)"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise SettingsError(
                f"{where}: a token must have at least {MIN_TOKEN_LENGTH} characters"
            )
        if token in roles:
            raise SettingsError(f"{where}: this token is listed twice")
        roles[token] = role
    return roles


def load_tokens(settings: Settings) -> Tokens | None:
    """The tokens of ``settings``, or None when the API is to be open.

    Reads ``KVSTORE_API_TOKENS_FILE`` when set. Raises ``SettingsError`` for
    an unreadable file, a bad entry, or a token file holding no token (an
    empty secret mount must not open the API).
    """
    if not settings.tokens_configured():
        return None
    entries: list[tuple[str, str]] = []
    if settings.api_tokens:
        variable = env_name("api_tokens")
        words = settings.api_tokens.replace(",", " ").split()
        entries += [
            (f"{variable} entry {number}", word)
            for number, word in enumerate(words, start=1)
        ]
    path = settings.api_tokens_file
    if path is not None:
        from_file = _file_entries(path)
        if not from_file:
            source = f"{env_name('api_tokens_file')}={str(path)!r}"
            raise SettingsError(f"{source}: holds no token")
        entries += from_file
    if not entries:
        raise SettingsError(f"{env_name('api_tokens')}: holds no token")
    return Tokens(parse_tokens(entries))


def _file_entries(path: Path) -> list[tuple[str, str]]:
    source = f"{env_name('api_tokens_file')}={str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{source}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{source}: not UTF-8 text") from None
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.partition("#")[0].strip()
        if entry:
            entries.append((f"{source} line {number}", entry))
    return entries


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths served without a token even when tokens are configured."""
    paths: set[str] = set()
    if not settings.auth_probes:
        paths |= PROBE_PATHS
    if not settings.auth_metrics:
        paths |= METRICS_PATHS
    if not settings.auth_docs:
        paths |= DOCS_PATHS
    return frozenset(paths)


def open_prefixes(settings: Settings) -> tuple[str, ...]:
    """Path prefixes served without a token, as ``open_paths``."""
    return () if settings.auth_docs else DOCS_PREFIXES


def install_auth(app: Quart, settings: Settings) -> None:
    """Require tokens on ``app`` when ``settings`` configure any.

    Without tokens no request hook is added, so an open API costs nothing per
    request; a warning is logged when serving starts instead. Raises
    ``SettingsError`` as ``load_tokens`` does.
    """
    tokens = load_tokens(settings)
    if tokens is None:

        @app.before_serving
        async def warn_open() -> None:
            log.warning(
                "no API tokens configured: anyone who can reach %s can read, "
                "change and delete every key",
                settings.bind,
            )

        return

    public = open_paths(settings)
    public_prefixes = open_prefixes(settings)

    @app.before_serving
    async def announce_tokens() -> None:
        log.info(
            "API tokens required: %d read-only, %d read-write",
            tokens.count(Role.READ),
            tokens.count(Role.WRITE),
            extra={"open_paths": sorted(public), "open_prefixes": public_prefixes},
        )

    @app.before_request
    async def require_token() -> None:
        # One context lookup, then plain dict and list reads: this runs on
        # every request, and each proxied ``request`` attribute costs a lookup.
        scope = cast(HTTPScope, request.scope)
        method = scope["method"]
        path = scope["path"]
        if method == "OPTIONS" or path in public or path.startswith(public_prefixes):
            return
        header = _authorization(scope["headers"])
        if header is None:
            raise UnauthorizedError(
                "this API needs a token: send Authorization: Bearer TOKEN",
                {"WWW-Authenticate": CHALLENGE},
            )
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer":
            raise UnauthorizedError(
                "only bearer tokens are accepted: send Authorization: Bearer TOKEN",
                {"WWW-Authenticate": CHALLENGE},
            )
        role = tokens.role(credentials.strip())
        if role is None:
            raise UnauthorizedError(
                "the bearer token is not valid",
                {"WWW-Authenticate": INVALID_TOKEN_CHALLENGE},
            )
        # An authenticated client learns of a wrong path or method (404, 405)
        # before its role is weighed: it already knows the API.
        if (
            role is Role.READ
            and method not in READ_METHODS
            and request.routing_exception is None
        ):
            raise ForbiddenError(
                f"this token may only read (GET, HEAD); {method} needs a rw token",
                {"WWW-Authenticate": READ_ONLY_CHALLENGE},
            )


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            return value
    return None
