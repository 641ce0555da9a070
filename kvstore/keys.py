"""Key checks and the translation of ``$`` filters into Redis glob patterns.

Pure functions: nothing here talks to Redis or HTTP, so the rules are easy to
test alone.

A filter matches a whole key. ``$`` stands for any run of characters, the
empty run included; every other character, ``*``, ``?``, ``[``, ``]`` and
``\\`` among them, matches only itself. Consecutive ``$`` count as one.
"""

import re

WILDCARD = "$"

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
_WILDCARD_RUNS = re.compile(r"\$+")


class InvalidKeyError(ValueError):
    """A key or filter breaks the rules; the message says which rule."""


def check_key(key: str, max_bytes: int) -> bytes:
    """Return ``key`` as UTF-8 bytes, or raise ``InvalidKeyError``.

    A key is a non-empty string of at most ``max_bytes`` UTF-8 bytes with no
    control characters (NUL, newlines, escapes and the like), which would
    make keys ambiguous in logs and terminals.
    """
    return _check_text(key, max_bytes, "key")


def _check_text(text: str, max_bytes: int, what: str) -> bytes:
    if not text:
        raise InvalidKeyError(f"a {what} must not be empty")
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise InvalidKeyError(f"a {what} must be valid UTF-8") from None
    if len(encoded) > max_bytes:
        raise InvalidKeyError(f"a {what} may have at most {max_bytes} UTF-8 bytes")
    if _CONTROL_CHARACTERS.search(text):
        raise InvalidKeyError(f"a {what} must not contain control characters")
    return encoded


def escape_glob(text: str) -> str:
    """Escape ``text`` so that a Redis glob matches it literally."""
    return _GLOB_SPECIALS.sub(r"\\\1", text)


def filter_to_glob(pattern: str, max_wildcards: int, max_bytes: int) -> str:
    """Translate a ``$`` filter into a Redis glob for the same keys.

    Raises ``InvalidKeyError`` when the filter is empty, too long, has control
    characters or more than ``max_wildcards`` runs of ``$``: Redis matches
    globs by backtracking, and many stars make crafted patterns slow.
    """
    _check_text(pattern, max_bytes, "filter")
    pieces = _WILDCARD_RUNS.split(pattern)
    if len(pieces) - 1 > max_wildcards:
        raise InvalidKeyError(
            f"a filter may have at most {max_wildcards} runs of {WILDCARD!r}"
        )
    return "*".join(escape_glob(piece) for piece in pieces)
