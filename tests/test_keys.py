"""Key rules and the translation of ``$`` filters into Redis globs."""

import pytest

from kvstore.keys import InvalidKeyError, check_key, escape_glob, filter_to_glob


@pytest.mark.parametrize(
    ("pattern", "glob"),
    [
        ("wo$d", "wo*d"),
        ("$", "*"),
        ("$$$", "*"),
        ("a$$b$c", "a*b*c"),
        ("plain", "plain"),
        ("a*b", "a\\*b"),
        ("q?", "q\\?"),
        ("[x]", "\\[x\\]"),
        ("back\\slash", "back\\\\slash"),
        ("$*$", "*\\**"),
    ],
)
def test_filter_to_glob_translates_wildcards_and_escapes_the_rest(
    pattern: str, glob: str
) -> None:
    assert filter_to_glob(pattern, max_wildcards=8, max_bytes=1024) == glob


def test_filter_wildcard_runs_are_limited() -> None:
    filter_to_glob("$a" * 3, max_wildcards=3, max_bytes=1024)

    with pytest.raises(InvalidKeyError, match="at most 3 runs"):
        filter_to_glob("$a" * 4, max_wildcards=3, max_bytes=1024)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("", "empty"), ("a\x00", "control"), ("é" * 6, "at most 10"), ("\ud800", "UTF-8")],
)
def test_bad_filters_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message):
        filter_to_glob(pattern, max_wildcards=8, max_bytes=10)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("x" * 11, "at most 10"),
        ("line\nbreak", "control"),
        ("tab\t", "control"),
        ("del\x7f", "control"),
        ("\udcff", "UTF-8"),
    ],
)
def test_bad_keys_are_refused(key: str, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message):
        check_key(key, max_bytes=10)


@pytest.mark.parametrize("key", ["a", "a/b", "with space", "ü" * 5, "*?[]\\$"])
def test_good_keys_are_returned_as_utf8(key: str) -> None:
    assert check_key(key, max_bytes=10) == key.encode()


def test_escape_glob_escapes_only_glob_specials() -> None:
    assert escape_glob("a*b?c[d]e\\f-g^h") == "a\\*b\\?c\\[d\\]e\\\\f-g^h"
