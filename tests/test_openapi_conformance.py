"""The service against its own OpenAPI description, with schemathesis.

Schemathesis generates requests for every operation of the description,
valid and invalid ones, sends them to a live ``kvstore serve`` and checks
each answer: no 5xx, and status, content type, headers and body as
described. The description is the one the service serves at
``/openapi.json``; a test checks that it is the one loaded here.
"""

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from kvstore.openapi import build_openapi
from kvstore.settings import Settings
from tests.services import Service, running

DESCRIPTION = build_openapi(Settings())

schema = schemathesis.openapi.from_dict(DESCRIPTION)


@pytest.fixture(scope="module")
def service(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A live service with default limits, on a key prefix of its own."""
    prefix = f"kvschema:{uuid.uuid4().hex[:12]}:"
    log_path = tmp_path_factory.mktemp("schema") / "kvstore.log"
    with running(log_path, {"REDIS_URL": redis_url, "KEY_PREFIX": prefix}) as live:
        yield live
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.unlink(*keys)


def test_the_served_description_is_the_one_tested(service: Service) -> None:
    served = httpx.get(f"{service.url}/openapi.json", timeout=10)

    assert served.status_code == 200
    assert served.json() == DESCRIPTION


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_conforms_to_the_description(
    case: schemathesis.Case[Any], service: Service
) -> None:
    case.call_and_validate(base_url=service.url)
