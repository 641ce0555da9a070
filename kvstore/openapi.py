"""The OpenAPI description of the HTTP API, and a page to read it.

Written out rather than derived from the routes: the API's rules (any JSON
value, problem+json errors, ``Expires-In``, limits taken from the settings)
are richer than route signatures can say. It is served at ``/openapi.json``
and rendered at ``/docs`` by the Swagger UI files that ``swagger-ui-py``
ships, so the page works offline.

The document is OpenAPI 3.1, whose JSON Schema can state the key rules for
the keys of a bulk body too (``propertyNames``). quart-schema was the other
candidate; it wraps every response conversion of the app, which costs the hot
path for nothing here.
"""

import importlib.util
from pathlib import Path
from typing import Any

import orjson
from quart import Blueprint, Response

from kvstore import __version__
from kvstore.auth import READ_METHODS, open_paths
from kvstore.errors import PROBLEM_JSON, problem_schema
from kvstore.settings import Settings

_JSON = "application/json"

# Regular expression classes (ECMA-262, as JSON Schema uses) for key text.
_NO_CONTROL = "[^\\u0000-\\u001f\\u007f]"
_NO_CONTROL_OR_WILDCARD = "[^\\u0000-\\u001f\\u007f$]"


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for a service running with ``settings``.

    With API tokens configured it declares the bearer scheme, marks the
    operations that need a token and adds their 401 and 403 answers.
    """
    any_value: dict[str, Any] = {"description": "Any JSON value."}
    # JSON Schema counts characters, the service UTF-8 bytes: the schema's
    # length limit is the byte limit, which any longer key surely breaks.
    key_schema = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_key_bytes,
        "pattern": f"^{_NO_CONTROL}+$",
    }
    pairs = {
        "type": "object",
        "additionalProperties": any_value,
        "description": "Keys and their JSON values.",
    }
    key_parameter = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": (
            f"The key: 1 to {settings.max_key_bytes} UTF-8 bytes, percent-encoded; "
            "may contain '/'; no control characters."
        ),
        "schema": key_schema,
    }
    expire_parameter = {
        "name": "expire_in",
        "in": "query",
        "required": False,
        "description": (
            "Lifetime in whole seconds. Without it the keys never expire and an "
            "earlier expiry is cleared."
        ),
        "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_expire_in},
    }
    filter_parameter = {
        "name": "filter",
        "in": "query",
        "required": False,
        "description": (
            "Match whole keys; '$' matches any run of characters (the empty run "
            "too), every other character only itself. At most "
            f"{settings.max_filter_wildcards} runs of '$'."
        ),
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": settings.max_key_bytes,
            "pattern": (
                f"^(?:{_NO_CONTROL_OR_WILDCARD}*\\$+)"
                f"{{0,{settings.max_filter_wildcards}}}{_NO_CONTROL_OR_WILDCARD}*$"
            ),
        },
    }
    expires_header = {
        "Expires-In": {
            "description": "Whole seconds the key has left (rounded up).",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    stored = {
        "type": "object",
        "required": ["stored"],
        "properties": {"stored": {"type": "integer", "minimum": 1}},
    }

    def ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "headers": _request_id_header(),
        }
        if schema is not None:
            response["content"] = {_JSON: {"schema": schema}}
        return response

    def with_problems(responses: dict[str, Any], *statuses: int) -> dict[str, Any]:
        for status in (*statuses, 405, 431, 503):
            responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
        return responses

    key_body = {"required": True, "content": {_JSON: {"schema": any_value}}}
    pairs_to_store = {
        **pairs,
        "propertyNames": key_schema,
        "minProperties": 1,
        "maxProperties": settings.max_pairs,
    }
    pair_body = {
        # The query form (no body, pairs as name=value query parameters, all
        # string values) cannot be stated beside a body in OpenAPI; it is
        # described here and in the README.
        "required": True,
        "description": (
            "A JSON object of pairs; each key as for /keys/{id}. Alternatively "
            "send no body and give the pairs as name=value query parameters, "
            "stored as string values."
        ),
        "content": {_JSON: {"schema": pairs_to_store}},
    }
    single = {"type": "object", "minProperties": 1, "maxProperties": 1}
    deleted = {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": {"type": "integer", "minimum": 0}},
    }
    status_body = {"type": "object", "properties": {"status": {"type": "string"}}}

    def head(summary: str, operation_id: str, **extra: Any) -> dict[str, Any]:
        """A HEAD operation: GET's status codes and headers, never a body."""
        responses: dict[str, dict[str, Any]] = {
            str(status): {"description": description, "headers": _request_id_header()}
            for status, description in (
                (200, "As for GET, without the body."),
                (400, "A bad request."),
                (404, "Not found."),
                (405, "Method not allowed."),
                (431, "The request head is too large."),
                (503, "Redis is unavailable."),
            )
        }
        for status, headers in extra.pop("headers", {}).items():
            responses[str(status)]["headers"].update(headers)
        return {
            "summary": summary,
            "operationId": operation_id,
            **extra,
            "responses": responses,
        }

    paths: dict[str, Any] = {
        "/keys": {
            "get": {
                "summary": "Read every pair, or those whose key matches a filter",
                "operationId": "readKeys",
                "parameters": [filter_parameter],
                "responses": with_problems(
                    {"200": ok("The matching pairs, streamed.", pairs)}, 400
                ),
            },
            "head": head(
                "Check that the pairs can be read (no scan is made)",
                "checkKeys",
                parameters=[filter_parameter],
            ),
            "put": {
                "summary": "Store one or many pairs, all or nothing",
                "operationId": "writeKeys",
                "parameters": [expire_parameter],
                "requestBody": pair_body,
                "responses": with_problems(
                    {"200": ok("All pairs stored.", stored)}, 400, 408, 413, 415
                ),
            },
            "delete": {
                "summary": "Delete every key, or those matching a filter",
                "operationId": "deleteKeys",
                "parameters": [filter_parameter],
                "responses": with_problems(
                    {"200": ok("How many keys were deleted.", deleted)}, 400
                ),
            },
        },
        "/keys/{id}": {
            "parameters": [key_parameter],
            "get": {
                "summary": "Read one key",
                "operationId": "readKey",
                "responses": with_problems(
                    {
                        "200": {
                            **ok("The pair, as {key: value}.", single),
                            "headers": {**_request_id_header(), **expires_header},
                        }
                    },
                    400,
                    404,
                ),
            },
            "head": head(
                "Check that a key exists",
                "checkKey",
                headers={200: expires_header},
            ),
            "put": {
                "summary": "Store one value",
                "operationId": "writeKey",
                "parameters": [expire_parameter],
                "requestBody": key_body,
                "responses": with_problems(
                    {
                        "200": ok("An existing value was replaced.", stored),
                        "201": {
                            **ok("The key was created.", stored),
                            "headers": {
                                **_request_id_header(),
                                "Location": {"schema": {"type": "string"}},
                            },
                        },
                    },
                    400,
                    408,
                    413,
                    415,
                ),
            },
            "delete": {
                "summary": "Delete one key",
                "operationId": "deleteKey",
                "responses": with_problems(
                    {
                        "204": {
                            "description": "Deleted.",
                            "headers": _request_id_header(),
                        }
                    },
                    400,
                    404,
                ),
            },
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "operationId": "healthz",
                "responses": {"200": ok("Alive.", status_body)},
            },
            "head": head("Liveness, without a body", "healthzHead"),
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers too",
                "operationId": "readyz",
                "responses": with_problems({"200": ok("Ready.", status_body)}),
            },
            "head": head("Readiness, without a body", "readyzHead"),
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, in the text exposition format",
                "description": (
                    "Served on the KVSTORE_METRICS_BIND listener instead when "
                    "that is set."
                ),
                "operationId": "metrics",
                "responses": with_problems(
                    {
                        "200": {
                            "description": "Every metric of the server.",
                            "headers": _request_id_header(),
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                ),
            },
            "head": head("Metrics, without a body", "metricsHead"),
        },
    }
    problems = {
        400: "Bad request: malformed JSON, a bad key, filter or expire_in.",
        404: "No such key (or it expired).",
        405: "Method not allowed; see the Allow header.",
        408: "The body did not arrive within KVSTORE_BODY_TIMEOUT seconds.",
        413: "The body, a value or the number of pairs is over its limit.",
        415: "A body was sent without a JSON content type.",
        431: "The request target and headers are over KVSTORE_MAX_HEADER_BYTES.",
        503: "Redis is unreachable or too slow; see Retry-After.",
    }
    responses = {
        str(status): {
            "description": description,
            "headers": _request_id_header(),
            "content": {
                PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for status, description in problems.items()
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "kvstore",
            "version": __version__,
            "description": "Store, read, expire, filter and delete JSON values.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Problem": problem_schema()},
            "responses": responses,
        },
    }
    if settings.tokens_configured():
        _add_security(document, settings)
    return document


def _add_security(document: dict[str, Any], settings: Settings) -> None:
    """Describe the bearer tokens: who needs one, and the 401 and 403 answers."""
    components = document["components"]
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "A token from KVSTORE_API_TOKENS or KVSTORE_API_TOKENS_FILE. "
                "Read-only (ro) tokens may GET and HEAD; read-write (rw) tokens "
                "may also PUT and DELETE."
            ),
        }
    }
    challenge = {
        "WWW-Authenticate": {
            "description": "The bearer challenge, with the error when one applies.",
            "schema": {"type": "string"},
        }
    }
    problems = {
        "401": "No token, or one that is not valid; see WWW-Authenticate.",
        "403": "A read-only token was used to write.",
    }
    for status, description in problems.items():
        components["responses"][status] = {
            "description": description,
            "headers": {**_request_id_header(), **challenge},
            "content": {
                PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
    document["security"] = [{"bearer": []}]
    public = open_paths(settings)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in _OPERATIONS:
                continue
            if path in public:
                operation["security"] = []
                continue
            responses = operation["responses"]
            if method == "head":
                responses["401"] = {"description": problems["401"]}
            else:
                responses["401"] = {"$ref": "#/components/responses/401"}
            if method.upper() not in READ_METHODS:
                responses["403"] = {"$ref": "#/components/responses/403"}


_OPERATIONS = frozenset({"get", "head", "put", "post", "delete", "patch"})


def _request_id_header() -> dict[str, Any]:
    return {
        "X-Request-ID": {
            "description": "The client's request id, or one made for this request.",
            "schema": {"type": "string"},
        }
    }


def swagger_ui_static() -> str:
    """The folder of Swagger UI's files that ``swagger-ui-py`` installs.

    Found without importing the package, which would load its framework
    integrations for nothing.
    """
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "static")


def create_blueprint(settings: Settings) -> Blueprint:
    """Routes for ``/openapi.json``, ``/docs`` and the page's static files."""
    document = orjson.dumps(build_openapi(settings))
    blueprint = Blueprint(
        "docs",
        __name__,
        static_folder=swagger_ui_static(),
        static_url_path="/docs/static",
    )

    @blueprint.route("/openapi.json", methods=["GET"])
    async def openapi() -> Response:
        return Response(document, content_type=_JSON)

    @blueprint.route("/docs", methods=["GET"])
    async def docs() -> Response:
        return Response(_DOCS_PAGE, content_type="text/html; charset=utf-8")

    return blueprint


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>kvstore API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="api"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.onload = () => {
  SwaggerUIBundle({url: "/openapi.json", dom_id: "#api", deepLinking: true});
};
</script>
</body>
</html>
"""
