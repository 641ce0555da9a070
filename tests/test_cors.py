"""Cross-origin requests: off by default, then by origin list or ``*``."""

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from hypercorn.typing import ASGISendCallable, ASGISendEvent, Scope
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.cors import CorsMiddleware
from kvstore.settings import Settings, SettingsError

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
TOKEN = "cors-test-token-0123456789"  # noqa: S105
EXPOSED = {"x-request-id", "expires-in", "location", "retry-after", "www-authenticate"}


def preflight(origin: str, method: str = "PUT") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-request-id",
    }


def header_set(value: str | None) -> set[str]:
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


@asynccontextmanager
async def serving(settings: Settings, **changes: Any) -> AsyncIterator[QuartClient]:
    """A client of an app with ``changes`` to the settings, serving for the block."""
    application = create_app(dataclasses.replace(settings, **changes))
    async with application.test_app():
        yield application.test_client()


async def test_cors_is_off_by_default(app: Quart, client: QuartClient) -> None:
    simple = await client.get("/healthz", headers={"Origin": ALLOWED})
    options = await client.options("/keys/k", headers=preflight(ALLOWED))

    assert not any(app.after_request_funcs.values())
    for response in (simple, options):
        assert not any(
            name.lower().startswith("access-control-")
            for name, _ in response.headers.items()
        )


async def test_an_allowed_origin_may_read_the_response(settings: Settings) -> None:
    async with serving(settings, cors_origins=(ALLOWED,)) as client:
        await client.put(
            "/keys/k?expire_in=60",
            data=b"1",
            headers={"Content-Type": "application/json", "Origin": ALLOWED},
        )
        response = await client.get("/keys/k", headers={"Origin": ALLOWED})

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert header_set(response.headers["Access-Control-Expose-Headers"]) == EXPOSED
    assert "origin" in header_set(response.headers["Vary"])
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_another_origin_gets_no_cors_headers(
    settings: Settings, redis_client: redis.Redis, key_prefix: str
) -> None:
    redis_client.set(f"{key_prefix}k", b"1")

    async with serving(settings, cors_origins=(ALLOWED, "http://localhost:8080")) as c:
        simple = await c.get("/keys/k", headers={"Origin": OTHER})
        options = await c.options("/keys/k", headers=preflight(OTHER))

    for response in (simple, options):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Methods" not in response.headers
        assert "origin" in header_set(response.headers["Vary"])


@pytest.mark.parametrize("path", ["/keys/k", "/keys", "/keys/a%2Fb"])
async def test_a_preflight_from_an_allowed_origin_is_answered(
    settings: Settings, path: str
) -> None:
    async with serving(settings, cors_origins=(ALLOWED,), cors_max_age=120) as client:
        response = await client.options(path, headers=preflight(ALLOWED, "DELETE"))

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert header_set(response.headers["Access-Control-Allow-Methods"]) == {
        "get",
        "head",
        "put",
        "delete",
    }
    assert header_set(response.headers["Access-Control-Allow-Headers"]) == {
        "authorization",
        "content-type",
        "x-request-id",
    }
    assert response.headers["Access-Control-Max-Age"] == "120"


async def test_a_preflight_for_other_headers_allows_only_the_known_ones(
    settings: Settings,
) -> None:
    headers = {**preflight(ALLOWED), "Access-Control-Request-Headers": "x-custom"}

    async with serving(settings, cors_origins=(ALLOWED,)) as client:
        response = await client.options("/keys/k", headers=headers)

    assert "x-custom" not in header_set(
        response.headers.get("Access-Control-Allow-Headers")
    )


async def test_the_wildcard_lets_every_origin_read(settings: Settings) -> None:
    async with serving(settings, cors_origins=("*",)) as client:
        simple = await client.get("/healthz", headers={"Origin": OTHER})
        options = await client.options("/keys/k", headers=preflight(OTHER))

    assert simple.headers["Access-Control-Allow-Origin"] == "*"
    assert options.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in simple.headers


async def test_with_tokens_preflights_pass_and_errors_are_readable(
    settings: Settings,
) -> None:
    secured = dataclasses.replace(settings, api_tokens=f"rw:{TOKEN}")

    async with serving(secured, cors_origins=(ALLOWED,)) as client:
        options = await client.options("/keys/k", headers=preflight(ALLOWED))
        refused = await client.get("/keys/k", headers={"Origin": ALLOWED})
        allowed = await client.get(
            "/keys/k", headers={"Origin": ALLOWED, "Authorization": f"Bearer {TOKEN}"}
        )

    assert options.status_code == 200
    assert options.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "www-authenticate" in header_set(
        refused.headers["Access-Control-Expose-Headers"]
    )
    assert allowed.status_code == 404
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_a_request_without_origin_only_learns_that_origin_matters(
    settings: Settings,
) -> None:
    async with serving(settings, cors_origins=(ALLOWED,)) as client:
        response = await client.get("/healthz")

    assert response.headers.getlist("Vary") == ["Origin"]
    assert not any(
        name.lower().startswith("access-control-")
        for name, _ in response.headers.items()
    )


async def test_refusals_made_before_routing_carry_cors_headers(
    settings: Settings,
) -> None:
    limited = dataclasses.replace(settings, max_header_bytes=1024)

    async with serving(limited, cors_origins=(ALLOWED,)) as client:
        response = await client.get(
            "/keys/k", headers={"Origin": ALLOWED, "X-Padding": "x" * 2048}
        )

    assert response.status_code == 431
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_a_vary_header_of_the_app_is_extended() -> None:
    sent: list[ASGISendEvent] = []

    async def app(scope: Scope, receive: object, send: ASGISendCallable) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"vary", b"Accept-Encoding")],
                "trailers": False,
            }
        )

    async def record(message: ASGISendEvent) -> None:
        sent.append(message)

    middleware = CorsMiddleware(app, [ALLOWED], max_age=60)
    scope = {
        "type": "http",
        "method": "GET",
        "headers": [(b"origin", ALLOWED.encode())],
    }
    await middleware(scope, None, record)  # type: ignore[arg-type]

    headers = sent[0]["headers"]  # type: ignore[typeddict-item]
    assert [value for name, value in headers if name == b"vary"] == [
        b"Accept-Encoding, Origin"
    ]


def test_origins_are_read_as_a_comma_separated_list() -> None:
    environ = {
        "KVSTORE_CORS_ORIGINS": "https://a.example, http://localhost:3000,",
        "KVSTORE_CORS_MAX_AGE": "0",
    }

    settings = Settings.from_env(environ)

    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
    assert settings.cors_max_age == 0
    assert Settings.from_env({}).cors_origins == ()


@pytest.mark.parametrize(
    ("origins", "reason"),
    [
        ("*,https://a.example", "'*' must be the only origin"),
        ("https://a.example/", "no path"),
        ("https://a.example/app", "no path"),
        ("a.example", "expected http(s)://HOST"),
        ("null", "expected http(s)://HOST"),
        ("ftp://a.example", "expected http(s)://HOST"),
        ("https://", "no path"),
        ("https://A.example", "lower case"),
        ("https://user@a.example", "no path"),
    ],
)
def test_malformed_origins_are_refused(origins: str, reason: str) -> None:
    with pytest.raises(SettingsError, match="KVSTORE_CORS_ORIGINS") as caught:
        Settings.from_env({"KVSTORE_CORS_ORIGINS": origins})

    assert reason in str(caught.value)


def test_a_negative_max_age_is_refused() -> None:
    with pytest.raises(SettingsError, match="KVSTORE_CORS_MAX_AGE"):
        Settings.from_env({"KVSTORE_CORS_MAX_AGE": "-1"})
