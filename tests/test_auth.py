"""Bearer tokens: parsing, roles, open paths and the OpenAPI description."""

import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from openapi_spec_validator import validate
from quart import Quart, Response
from quart.typing import TestClientProtocol as QuartClient

from kvstore import auth
from kvstore.app import create_app
from kvstore.auth import Role, Tokens, load_tokens, parse_tokens
from kvstore.cli import main
from kvstore.settings import Settings, SettingsError

READ_TOKEN = "read-0123456789abcdefXYZ"  # noqa: S105
WRITE_TOKEN = "write-0123456789abcdef/+~."  # noqa: S105
JSON_HEADERS = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, api_tokens=f"ro:{READ_TOKEN}, rw:{WRITE_TOKEN}"
    )


@pytest.fixture
async def secured_app(secured: Settings) -> AsyncIterator[Quart]:
    application = create_app(secured)
    async with application.test_app():
        yield application


@pytest.fixture
def secured_client(secured_app: Quart) -> QuartClient:
    return secured_app.test_client()


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[QuartClient]:
    """A client of an app built from ``settings``, serving for the block."""
    application = create_app(settings)
    async with application.test_app():
        yield application.test_client()


async def send(
    client: QuartClient,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Response:
    """Send one request with any of the API's methods."""
    call = {
        "GET": client.get,
        "HEAD": client.head,
        "PUT": client.put,
        "DELETE": client.delete,
    }[method]
    return await call(path, data=body, headers=headers or {})


# Parsing the token settings.


def test_tokens_come_from_the_variable_and_the_file(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# kvstore tokens\n\n"
        "ro:file-reader-0123456789  # the dashboard\n"
        "  rw:file-writer-0123456789\n"
    )
    configured = dataclasses.replace(
        settings,
        api_tokens=f"ro:{READ_TOKEN},\nrw:{WRITE_TOKEN}",
        api_tokens_file=path,
    )

    tokens = load_tokens(configured)

    assert tokens is not None
    assert len(tokens) == 4
    assert tokens.role(READ_TOKEN) is Role.READ
    assert tokens.role(WRITE_TOKEN) is Role.WRITE
    assert tokens.role("file-reader-0123456789") is Role.READ
    assert tokens.role("file-writer-0123456789") is Role.WRITE
    assert tokens.role("file-writer-012345678") is None
    assert tokens.role("") is None


def test_no_token_settings_mean_an_open_api(settings: Settings) -> None:
    assert load_tokens(settings) is None


SECRET = "s3cret-0123456789abcdef"  # noqa: S105


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (SECRET, "expected ro:TOKEN or rw:TOKEN"),
        (f"admin:{SECRET}", "expected ro:TOKEN or rw:TOKEN"),
        (f"RW:{SECRET}", "expected ro:TOKEN or rw:TOKEN"),
        (f"rw:{SECRET[:15]}", "at least 16 characters"),
        (f"rw:{SECRET}:more", "only letters, digits"),
        (f'rw:"{SECRET}"', "only letters, digits"),
        (f"rw:{SECRET}=x", "only letters, digits"),
        (f"rw:{READ_TOKEN}", "listed twice"),
    ],
)
def test_bad_token_entries_are_refused_without_showing_them(
    settings: Settings, entry: str, reason: str
) -> None:
    configured = dataclasses.replace(settings, api_tokens=f"ro:{READ_TOKEN} {entry}")

    with pytest.raises(SettingsError) as caught:
        load_tokens(configured)

    message = str(caught.value)
    assert reason in message
    assert "KVSTORE_API_TOKENS entry 2" in message
    assert SECRET[:15] not in message
    assert READ_TOKEN not in message


def test_a_bad_line_in_the_token_file_is_named_by_line(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# header\nro:{READ_TOKEN}\nwrite:{SECRET}\n")
    configured = dataclasses.replace(settings, api_tokens_file=path)

    with pytest.raises(SettingsError, match="line 3: expected ro:TOKEN") as caught:
        load_tokens(configured)

    assert "KVSTORE_API_TOKENS_FILE" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("content", ["", "\n", "# no token yet\n\n"])
def test_a_token_file_without_tokens_is_refused(
    settings: Settings, tmp_path: Path, content: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    configured = dataclasses.replace(settings, api_tokens_file=path)

    with pytest.raises(SettingsError, match="holds no token"):
        load_tokens(configured)


def test_an_unreadable_token_file_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    configured = dataclasses.replace(settings, api_tokens_file=tmp_path / "missing")

    with pytest.raises(SettingsError, match=r"KVSTORE_API_TOKENS_FILE=.*cannot read"):
        create_app(configured)


def test_a_token_variable_of_separators_only_is_refused(settings: Settings) -> None:
    configured = dataclasses.replace(settings, api_tokens=" , ,")

    with pytest.raises(SettingsError, match="KVSTORE_API_TOKENS: holds no token"):
        load_tokens(configured)


def test_the_token_settings_are_read_from_the_environment(tmp_path: Path) -> None:
    environ = {
        "KVSTORE_API_TOKENS": f"ro:{READ_TOKEN}",
        "KVSTORE_API_TOKENS_FILE": str(tmp_path / "tokens"),
        "KVSTORE_AUTH_PROBES": "true",
        "KVSTORE_AUTH_METRICS": "false",
        "KVSTORE_AUTH_DOCS": "yes",
    }

    settings = Settings.from_env(environ)

    assert settings.api_tokens == f"ro:{READ_TOKEN}"
    assert settings.api_tokens_file == tmp_path / "tokens"
    assert (settings.auth_probes, settings.auth_metrics, settings.auth_docs) == (
        True,
        False,
        True,
    )
    assert READ_TOKEN not in repr(settings)
    assert settings.public()["api_tokens"] == "***"
    assert settings.public()["api_tokens_file"] == str(tmp_path / "tokens")


def test_a_token_is_compared_with_every_configured_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = Tokens({f"token-number-{index:04}": Role.READ for index in range(5)})
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(left: bytes, right: bytes) -> bool:
        calls.append((left, right))
        return compare(left, right)

    monkeypatch.setattr(hmac, "compare_digest", counting)

    first = tokens.role("token-number-0000")
    unknown = tokens.role("not-a-token-at-all")

    assert first is Role.READ
    assert unknown is None
    assert len(calls) == 10
    assert all(len(left) == len(right) == 32 for left, right in calls)


def test_parse_tokens_keeps_roles() -> None:
    roles = parse_tokens([("a", f"ro:{READ_TOKEN}"), ("b", f"rw:{WRITE_TOKEN}")])

    assert roles == {READ_TOKEN: Role.READ, WRITE_TOKEN: Role.WRITE}


# An open API.


async def test_without_tokens_no_request_hook_runs(app: Quart) -> None:
    hooks = [
        hook for functions in app.before_request_funcs.values() for hook in functions
    ]

    response = await app.test_client().get("/keys/missing")

    assert hooks == []
    assert response.status_code == 404


async def test_without_tokens_a_warning_is_logged_once_at_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    application = create_app(settings)

    with caplog.at_level(logging.INFO, logger="kvstore"):
        async with application.test_app():
            await application.test_client().get("/keys/missing")
            await application.test_client().get("/healthz")

    warnings = [r for r in caplog.records if "no API tokens" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "anyone who can reach 127.0.0.1:5000" in warnings[0].getMessage()


async def test_with_tokens_the_start_line_counts_them_and_shows_none(
    secured: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    application = create_app(secured)

    with caplog.at_level(logging.INFO, logger="kvstore"):
        async with application.test_app():
            pass

    messages = [record.getMessage() for record in caplog.records]
    assert "API tokens required: 1 read-only, 1 read-write" in messages
    assert not any("no API tokens" in message for message in messages)
    assert READ_TOKEN not in caplog.text
    assert WRITE_TOKEN not in caplog.text


# A secured API.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/keys/k"),
        ("HEAD", "/keys/k"),
        ("GET", "/keys"),
        ("PUT", "/keys/k"),
        ("PUT", "/keys"),
        ("DELETE", "/keys/k"),
        ("DELETE", "/keys"),
        ("GET", "/no-such-path"),
    ],
)
async def test_a_request_without_a_token_is_401_with_a_challenge(
    secured_client: QuartClient, method: str, path: str
) -> None:
    response = await send(secured_client, method, path)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="kvstore"'
    if method != "HEAD":
        body = await response.get_json()
        assert response.content_type == "application/problem+json"
        assert body["status"] == 401
        assert "Authorization: Bearer" in body["detail"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong-token-0123456789",
        f"Bearer {READ_TOKEN}x",
        f"Bearer {READ_TOKEN[:-1]}",
        "Bearer ",
        "Bearer",
        f"Token {READ_TOKEN}",
    ],
)
async def test_a_wrong_token_is_401(secured_client: QuartClient, header: str) -> None:
    response = await secured_client.get("/keys/k", headers={"Authorization": header})

    body = await response.get_json()
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="kvstore"')
    assert READ_TOKEN not in str(body)


async def test_a_wrong_bearer_token_is_called_invalid(
    secured_client: QuartClient,
) -> None:
    response = await secured_client.get("/keys/k", headers=bearer("not-the-token-1234"))

    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="kvstore", error="invalid_token"'
    )
    assert (await response.get_json())["detail"] == "the bearer token is not valid"


async def test_another_scheme_gets_the_plain_challenge(
    secured_client: QuartClient,
) -> None:
    response = await secured_client.get(
        "/keys/k", headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="kvstore"'


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_a_read_token_reads(
    secured_client: QuartClient, redis_client: redis.Redis, key_prefix: str, scheme: str
) -> None:
    redis_client.set(f"{key_prefix}k", b'{"a":1}')
    headers = {"Authorization": f"{scheme} {READ_TOKEN}"}

    one = await secured_client.get("/keys/k", headers=headers)
    head = await secured_client.head("/keys/k", headers=headers)
    every = await secured_client.get("/keys", headers=headers)

    assert one.status_code == head.status_code == every.status_code == 200
    assert await one.get_json() == {"k": {"a": 1}}
    assert await every.get_json() == {"k": {"a": 1}}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/keys/k", b"2"),
        ("PUT", "/keys/new", b"2"),
        ("PUT", "/keys", b'{"k": 2, "new": 3}'),
        ("PUT", "/keys?k=2", b""),
        ("DELETE", "/keys/k", b""),
        ("DELETE", "/keys", b""),
        ("DELETE", "/keys?filter=$", b""),
    ],
)
async def test_a_read_token_writing_is_403_and_changes_nothing(
    secured_client: QuartClient,
    redis_client: redis.Redis,
    key_prefix: str,
    method: str,
    path: str,
    body: bytes,
) -> None:
    redis_client.set(f"{key_prefix}k", b"1")

    response = await send(
        secured_client, method, path, body, {**bearer(READ_TOKEN), **JSON_HEADERS}
    )

    problem = await response.get_json()
    assert response.status_code == 403
    assert response.content_type == "application/problem+json"
    assert problem["title"] == "Forbidden"
    assert "rw token" in problem["detail"]
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert redis_client.get(f"{key_prefix}k") == b"1"
    assert redis_client.keys(f"{key_prefix}*") == [f"{key_prefix}k".encode()]


async def test_a_write_token_reads_and_writes(
    secured_client: QuartClient, redis_client: redis.Redis, key_prefix: str
) -> None:
    headers = {**bearer(WRITE_TOKEN), **JSON_HEADERS}

    created = await secured_client.put("/keys/k", data=b"[1]", headers=headers)
    bulk = await secured_client.put("/keys", data=b'{"a": 1}', headers=headers)
    read = await secured_client.get("/keys/k", headers=headers)
    deleted = await secured_client.delete("/keys/a", headers=headers)

    assert (created.status_code, bulk.status_code) == (201, 200)
    assert await read.get_json() == {"k": [1]}
    assert deleted.status_code == 204
    assert redis_client.get(f"{key_prefix}k") == b"[1]"
    assert redis_client.exists(f"{key_prefix}a") == 0


async def test_an_authenticated_client_learns_of_wrong_paths_and_methods(
    secured_client: QuartClient,
) -> None:
    missing = await secured_client.get("/no-such-path", headers=bearer(READ_TOKEN))
    posted = await secured_client.post("/keys/k", headers=bearer(READ_TOKEN))

    assert missing.status_code == 404
    assert posted.status_code == 405


async def test_options_needs_no_token(secured_client: QuartClient) -> None:
    response = await secured_client.options("/keys/k")

    assert response.status_code == 200
    assert {"GET", "PUT", "DELETE"} <= set(response.headers["Allow"].split(", "))


# Paths opened or closed by settings.


async def test_probes_and_docs_are_open_by_default(
    secured_client: QuartClient,
) -> None:
    healthz = await secured_client.get("/healthz")
    readyz = await secured_client.get("/readyz")
    document = await secured_client.get("/openapi.json")
    docs = await secured_client.get("/docs")
    script = await secured_client.get("/docs/static/swagger-ui-bundle.js")

    assert healthz.status_code == readyz.status_code == 200
    assert document.status_code == docs.status_code == 200
    assert script.status_code == 200


async def test_metrics_need_a_token_by_default(secured_client: QuartClient) -> None:
    anonymous = await secured_client.get("/metrics")
    reader = await secured_client.get("/metrics", headers=bearer(READ_TOKEN))

    assert anonymous.status_code == 401
    assert reader.status_code != 401


@pytest.mark.parametrize(
    ("changes", "closed", "opened"),
    [
        ({"auth_probes": True}, ["/healthz", "/readyz"], ["/openapi.json", "/docs"]),
        (
            {"auth_docs": True},
            ["/openapi.json", "/docs", "/docs/static/swagger-ui.css"],
            ["/healthz", "/readyz"],
        ),
        ({"auth_metrics": False}, ["/keys"], ["/metrics", "/healthz"]),
    ],
)
async def test_each_group_of_paths_is_configured_alone(
    secured: Settings, changes: dict[str, Any], closed: list[str], opened: list[str]
) -> None:
    configured = dataclasses.replace(secured, **changes)

    async with serving(configured) as client:
        closed_statuses = [(await client.get(path)).status_code for path in closed]
        opened_statuses = [(await client.get(path)).status_code for path in opened]
        with_token = [
            (await client.get(path, headers=bearer(READ_TOKEN))).status_code
            for path in closed
        ]

    assert closed_statuses == [401] * len(closed)
    assert 401 not in opened_statuses
    assert 401 not in with_token


# The OpenAPI description.


async def document_of(client: QuartClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    document: dict[str, Any] = await response.get_json()
    return document


async def test_the_open_api_describes_no_security(client: QuartClient) -> None:
    document = await document_of(client)

    assert "security" not in document
    assert "securitySchemes" not in document["components"]
    assert "401" not in document["paths"]["/keys/{id}"]["get"]["responses"]


async def test_the_secured_api_describes_bearer_tokens(
    secured_client: QuartClient,
) -> None:
    document = await document_of(secured_client)

    paths = document["paths"]
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearer": []}]
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/readyz"]["get"]["security"] == []
    for path, method in [("/keys", "get"), ("/keys/{id}", "get")]:
        responses = paths[path][method]["responses"]
        assert "security" not in paths[path][method]
        assert responses["401"] == {"$ref": "#/components/responses/401"}
        assert "403" not in responses
    assert "401" in paths["/keys/{id}"]["head"]["responses"]
    for path, method in [("/keys", "put"), ("/keys", "delete"), ("/keys/{id}", "put")]:
        responses = paths[path][method]["responses"]
        assert responses["403"] == {"$ref": "#/components/responses/403"}
    assert "WWW-Authenticate" in document["components"]["responses"]["401"]["headers"]
    validate(document)


async def test_protected_probes_are_described_as_protected(secured: Settings) -> None:
    configured = dataclasses.replace(secured, auth_probes=True)

    async with serving(configured) as client:
        document = await document_of(client)

    assert "security" not in document["paths"]["/healthz"]["get"]
    assert "401" in document["paths"]["/healthz"]["get"]["responses"]


def test_open_paths_follow_the_settings(settings: Settings) -> None:
    everything_closed = dataclasses.replace(
        settings, auth_probes=True, auth_metrics=True, auth_docs=True
    )

    default = auth.open_paths(settings), auth.open_prefixes(settings)
    closed = auth.open_paths(everything_closed), auth.open_prefixes(everything_closed)

    assert default == (
        frozenset({"/healthz", "/readyz", "/openapi.json", "/docs"}),
        ("/docs/static/",),
    )
    assert closed == (frozenset(), ())


def test_serve_stops_with_one_line_when_a_token_is_bad(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVSTORE_API_TOKENS", f"rw:{WRITE_TOKEN} rw:{SECRET[:10]}")

    status = main(["serve"])

    error = capsys.readouterr().err
    assert status == 2
    assert error == (
        "kvstore: KVSTORE_API_TOKENS entry 2: "
        "a token must have at least 16 characters\n"
    )
