"""Counts written as text by someone else (a header, a query parameter, a directory name, a cgroup
file), read without trusting `str.isdigit`.

`"²".isdigit()` is true and `int("²")` raises, and `int` refuses more than 4,300 digits: a guard
of `text.isdigit() and int(text)` turned either into an unhandled ValueError, a 500 where the
client deserved a 4xx. A count here is ASCII digits only, and few enough of them that `int` is
cheap and the value fits an int64.
"""
from __future__ import annotations

MAX_DIGITS = 18  # below 2**63: every count a client sends fits an int64


def ascii_count(text: str | bytes | None, max_digits: int = MAX_DIGITS) -> int | None:
    """The non-negative integer `text` spells in ASCII digits (at most `max_digits` of them), else
    None: signs, spaces, Unicode digits and over-long numbers are not counts."""
    if text is None:
        return None
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def count_from_text(value: object) -> object:
    """A pydantic `BeforeValidator` for integers sent as text (path and query parameters): the text
    must be an `ascii_count`. pydantic's lax `int` takes `1.0`, `+1`, ` 1` and `1_0` for 1 and 10,
    so `/versions/1.0` once reached version 1; other values pass on to the type's own checks."""
    if isinstance(value, (str, bytes)):
        count = ascii_count(value)
        if count is None:
            raise ValueError(f"an integer written in ASCII digits only (no sign, point, space or underscore), at most {MAX_DIGITS} of them")
        return count
    return value


def version_from_text(value: object) -> object:
    """`count_from_text` for a model version: also no leading zero. The repository reads version
    folders as their canonical numbers (a folder `01` is no version), and `/versions/01` reached
    version 1: one version had two names, and a cache keyed by URL two copies of it."""
    if isinstance(value, (str, bytes)) and len(value) > 1 and value[:1] in ("0", b"0"):
        raise ValueError("a version number as the repository names its folders: ASCII digits, no leading zero")
    return count_from_text(value)
