"""The ``/keys`` routes: HTTP in, store calls, HTTP out.

Routes check and shape requests and responses; they never build Redis
commands. Values travel as compact JSON text: a value read from the store is
spliced into the response body as it is, never parsed again.
"""

import math
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import orjson
from quart import Blueprint, Response, request
from werkzeug.routing import PathConverter

from kvstore.errors import (
    BadRequestError,
    NotFoundError,
    TooLargeError,
    UnsupportedMediaTypeError,
)
from kvstore.keys import InvalidKeyError, check_key, filter_to_glob
from kvstore.settings import Settings
from kvstore.store import Store

JSON = "application/json"
EXPIRE_IN = "expire_in"
FILTER = "filter"
KEY_ROUTE_PREFIX = b"/keys/"


class KeyConverter(PathConverter):
    """Match the rest of the path, slashes and control characters included.

    Werkzeug's own path converter stops at a newline, which would turn a key
    with a control character into a 404 instead of a clear 400.
    """

    regex = r"[\s\S]+"
    part_isolating = False


class StoreHolder:
    """Gives routes the store, which exists only while the app is serving."""

    store: Store


def create_blueprint(settings: Settings, holder: StoreHolder) -> Blueprint:
    """The ``/keys`` blueprint, bound to ``settings`` and the held store.

    The app must register ``KeyConverter`` as the ``key`` converter.
    """
    blueprint = Blueprint("keys", __name__)

    @blueprint.route("/keys", methods=["GET"])
    async def read_all() -> Response:
        query = _query()
        glob = _glob(query, settings)
        if request.method == "HEAD":
            # A HEAD must not cost a scan of every key: check Redis answers.
            await holder.store.ping()
            return Response(b"", content_type=JSON)
        batches = holder.store.scan(glob)
        first = await anext(batches, None)
        body = _stream_object(first, batches)
        return Response(body, content_type=JSON)

    @blueprint.route("/keys", methods=["PUT"])
    async def write_many() -> Response:
        query = _query()
        expire_in = _expire_in(query, settings)
        body = await _body()
        if body:
            if set(query) - {EXPIRE_IN}:
                raise BadRequestError(
                    "send pairs either as a JSON body or in the query string, not both"
                )
            document = _parse_json(body)
            if not isinstance(document, dict):
                raise BadRequestError("the body must be a JSON object of key: value")
        else:
            document = {k: v for k, v in query.items() if k != EXPIRE_IN}
            if not document:
                raise BadRequestError(
                    "nothing to store: send a JSON object, or key=value pairs "
                    "in the query string"
                )
        pairs = _encode_pairs(document, settings)
        await holder.store.put_many(pairs, expire_in)
        return _json({"stored": len(pairs)})

    @blueprint.route("/keys", methods=["DELETE"])
    async def delete_many() -> Response:
        glob = _glob(_query(), settings)
        deleted = await holder.store.delete_matching(glob)
        return _json({"deleted": deleted})

    @blueprint.route("/keys/", methods=["GET", "PUT", "DELETE"])
    async def empty_key() -> Response:
        raise BadRequestError("a key must not be empty")

    @blueprint.route("/keys/<key:key>", methods=["GET"])
    async def read_one(key: str) -> Response:
        key = _path_key(key, settings)
        if request.method == "HEAD":
            meta = await holder.store.head(key)
            if meta is None:
                raise NotFoundError(f"no key {key!r}")
            response = Response(b"", content_type=JSON)
            response.content_length = len(_pair_prefix(key)) + meta.size + 1
            _set_expiry(response, meta.ttl_ms)
            return response
        entry = await holder.store.get(key)
        if entry is None:
            raise NotFoundError(f"no key {key!r}")
        response = Response(_pair_prefix(key) + entry.value + b"}", content_type=JSON)
        _set_expiry(response, entry.ttl_ms)
        return response

    @blueprint.route("/keys/<key:key>", methods=["PUT"])
    async def write_one(key: str) -> Response:
        key = _path_key(key, settings)
        expire_in = _expire_in(_query(), settings)
        body = await _body()
        if not body:
            raise BadRequestError("the body must be one JSON value")
        value = _encode_value(key, _parse_json(body), settings)
        created = await holder.store.put(key, value, expire_in)
        response = _json({"stored": 1}, 201 if created else 200)
        if created:
            response.headers["Location"] = "/keys/" + quote(key, safe="")
        return response

    @blueprint.route("/keys/<key:key>", methods=["DELETE"])
    async def delete_one(key: str) -> Response:
        key = _path_key(key, settings)
        if not await holder.store.delete(key):
            raise NotFoundError(f"no key {key!r}")
        return Response(b"", status=204)

    return blueprint


def _json(document: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status=status, content_type=JSON)


def _pair_prefix(key: str) -> bytes:
    return b"{" + orjson.dumps(key) + b":"


def _set_expiry(response: Response, ttl_ms: int | None) -> None:
    if ttl_ms is not None:
        response.headers["Expires-In"] = str(max(1, math.ceil(ttl_ms / 1000)))


def _query() -> dict[str, str]:
    """The query string as a dict, decoded strictly; repeats are a 400."""
    raw = request.query_string
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeError:
        raise BadRequestError("the query string is not valid UTF-8") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise BadRequestError(f"query parameter {name!r} is given twice")
        query[name] = value
    return query


def _expire_in(query: dict[str, str], settings: Settings) -> int | None:
    text = query.get(EXPIRE_IN)
    if text is None:
        return None
    limit = settings.max_expire_in
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(limit)):
        raise BadRequestError(
            f"expire_in must be a whole number of seconds from 1 to {limit}"
        )
    seconds = int(text)
    if not 1 <= seconds <= limit:
        raise BadRequestError(
            f"expire_in must be a whole number of seconds from 1 to {limit}"
        )
    return seconds


def _glob(query: dict[str, str], settings: Settings) -> str | None:
    pattern = query.get(FILTER)
    if pattern is None:
        return None
    try:
        return filter_to_glob(
            pattern, settings.max_filter_wildcards, settings.max_key_bytes
        )
    except InvalidKeyError as exc:
        raise BadRequestError(str(exc)) from None


def _path_key(key: str, settings: Settings) -> str:
    """The key of a ``/keys/{id}`` request, decoded strictly from the raw path.

    The server's decoded path replaces invalid UTF-8 silently; the raw path
    lets a key with broken percent-encoding be refused instead.
    """
    raw_path = request.scope.get("raw_path")
    if raw_path and raw_path.startswith(KEY_ROUTE_PREFIX):
        try:
            key = unquote_to_bytes(raw_path[len(KEY_ROUTE_PREFIX) :]).decode()
        except UnicodeDecodeError:
            raise BadRequestError("a key must be valid UTF-8") from None
    try:
        check_key(key, settings.max_key_bytes)
    except InvalidKeyError as exc:
        raise BadRequestError(str(exc)) from None
    return key


async def _body() -> bytes:
    """The request body; a non-empty one must be declared as JSON."""
    body = cast(bytes, await request.get_data(cache=False, as_text=False))
    if body and not _is_json(request.mimetype):
        shown = request.mimetype or "none"
        raise UnsupportedMediaTypeError(
            f"the body must be sent as {JSON} (Content-Type was {shown})"
        )
    return body


def _is_json(mimetype: str) -> bool:
    return mimetype == JSON or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from None


def _encode_value(key: str, value: Any, settings: Settings) -> bytes:
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise BadRequestError(
            f"the value of {key!r} is nested too deeply (at most 254 levels)"
        ) from None
    if len(encoded) > settings.max_value_bytes:
        raise TooLargeError(
            f"the value of {key!r} has {len(encoded)} bytes as compact JSON; "
            f"at most {settings.max_value_bytes} are allowed"
        )
    return encoded


def _encode_pairs(document: dict[str, Any], settings: Settings) -> dict[str, bytes]:
    _check_pair_count(len(document), settings)
    pairs: dict[str, bytes] = {}
    for key, value in document.items():
        _check_body_key(key, settings)
        pairs[key] = _encode_value(key, value, settings)
    return pairs


def _check_pair_count(count: int, settings: Settings) -> None:
    if count == 0:
        raise BadRequestError("the object must have at least one key")
    if count > settings.max_pairs:
        raise TooLargeError(
            f"{count} pairs in one request; at most {settings.max_pairs} are allowed"
        )


def _check_body_key(key: str, settings: Settings) -> None:
    try:
        check_key(key, settings.max_key_bytes)
    except InvalidKeyError as exc:
        raise BadRequestError(f"{exc}: {key[:64]!r}") from None


async def _stream_object(
    first: list[tuple[str, bytes]] | None,
    batches: AsyncIterator[list[tuple[str, bytes]]],
) -> AsyncIterator[bytes]:
    """Yield a JSON object of every pair, one chunk per batch."""
    if first is None:
        yield b"{}"
        return
    yield b"{" + _join_pairs(first)
    async for batch in batches:
        yield b"," + _join_pairs(batch)
    yield b"}"


def _join_pairs(batch: list[tuple[str, bytes]]) -> bytes:
    dumps = orjson.dumps
    return b",".join([dumps(key) + b":" + value for key, value in batch])
