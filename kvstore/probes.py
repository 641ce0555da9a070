"""Liveness and readiness probes: ``/healthz`` and ``/readyz``.

``/healthz`` says the process answers HTTP and never touches Redis, so an
orchestrator does not restart a healthy replica because Redis is down.
``/readyz`` says Redis answers too; when it does not, the store error becomes
a 503 with ``Retry-After`` like any other request.
"""

import orjson
from quart import Blueprint, Response

from kvstore.api import JSON, StoreHolder


def create_blueprint(holder: StoreHolder) -> Blueprint:
    """The probe routes, reading the store from ``holder``."""
    blueprint = Blueprint("probes", __name__)

    @blueprint.route("/healthz", methods=["GET"])
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), content_type=JSON)

    @blueprint.route("/readyz", methods=["GET"])
    async def readyz() -> Response:
        await holder.store.ping()
        return Response(orjson.dumps({"status": "ready"}), content_type=JSON)

    return blueprint
