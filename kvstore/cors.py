"""Cross-origin resource sharing, for browser pages on other origins.

Off unless ``KVSTORE_CORS_ORIGINS`` lists origins (``https://app.example``,
comma-separated) or is ``*``. When on, Quart-CORS answers preflights and adds
the ``Access-Control-*`` headers to every response, errors included, so a
page can read a 401 or a 503 as well as a value. Listed origins are echoed
back with ``Vary: Origin``; ``*`` lets every page read the API, which with no
tokens configured means any site a visitor opens can read and change the
data through their browser. Cookies are never involved: clients authenticate
with an ``Authorization`` header, which needs no credentialed CORS mode.
"""

from quart import Quart
from quart_cors import cors

from kvstore.settings import Settings

ALLOWED_METHODS = ("GET", "HEAD", "PUT", "DELETE")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Request-ID")
EXPOSED_HEADERS = (
    "X-Request-ID",
    "Expires-In",
    "Location",
    "Retry-After",
    "WWW-Authenticate",
)


def install_cors(app: Quart, settings: Settings) -> None:
    """Answer cross-origin requests from ``settings.cors_origins``, if any.

    With no origins nothing is installed, and responses carry no CORS
    headers, so browsers keep pages of other origins from reading them.
    """
    if not settings.cors_origins:
        return
    cors(
        app,
        allow_origin=list(settings.cors_origins),
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        allow_credentials=False,
        max_age=settings.cors_max_age,
        send_origin_wildcard=True,
    )
