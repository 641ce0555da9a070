"""Probes and the API description."""

from typing import Any

from openapi_spec_validator import validate
from quart import Quart
from quart.typing import TestClientProtocol as QuartClient


async def test_healthz_is_200(client: QuartClient) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


async def test_readyz_is_200_when_redis_answers(client: QuartClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 200
    assert await response.get_json() == {"status": "ready"}


async def test_openapi_document_is_valid_openapi_3(client: QuartClient) -> None:
    response = await client.get("/openapi.json")

    document: dict[str, Any] = await response.get_json()

    assert response.status_code == 200
    assert document["openapi"].startswith("3.")
    validate(document)


async def test_openapi_documents_every_api_route(
    app: Quart, client: QuartClient
) -> None:
    document = await (await client.get("/openapi.json")).get_json()
    undocumented = {"/docs/static/<path:filename>", "/openapi.json", "/docs", "/keys/"}

    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule in undocumented:
            continue
        path = rule.rule.replace("<key:key>", "{id}")
        routes.setdefault(path, set()).update(
            method.lower() for method in rule.methods or () if method != "OPTIONS"
        )

    for path, methods in routes.items():
        assert path in document["paths"], path
        assert methods <= set(document["paths"][path]), (path, methods)


async def test_docs_page_is_served(client: QuartClient) -> None:
    response = await client.get("/docs")

    page = await response.get_data(as_text=True)
    script = await client.get("/docs/static/swagger-ui-bundle.js")

    assert response.status_code == 200
    assert "/openapi.json" in page
    assert script.status_code == 200
    assert len(await script.get_data()) > 100_000
