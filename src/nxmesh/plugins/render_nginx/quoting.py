"""Turn values into nginx tokens that cannot add a directive, a block or a variable.

This is the renderer's second wall: the model's allow-lists (`nxmesh.core.validation`)
are the first, so nothing here repairs input. Every ``{{ ... }}`` in a template goes
through `token` (the environment's ``finalize``), which plays the role HTML autoescaping
plays for web pages:

- ``int`` → its digits; ``bool`` → ``on``/``off``; ``None`` and containers are refused
  (they are template bugs, not values).
- A string made only of characters nginx treats as ordinary is written bare
  (``example.com``, ``/static/``, ``127.0.0.1:8080``).
- Anything else is written in double quotes with ``\\`` and ``"`` backslash-escaped, so
  ``;``, ``{``, ``}``, ``#`` and spaces inside it are plain text to nginx.
- ``$`` would make nginx expand a variable in every script-valued directive
  (``add_header``, ``return``, ``proxy_set_header``, ``root``...). nginx has no escape for
  it, so a literal ``$`` is written as ``${nxmesh_dollar}``, a ``geo`` variable the base
  template defines as ``"$"``.
- Control characters (line breaks, NUL, bidi overrides, anything in Unicode category C)
  are refused with `UnsafeValueError`: there is no way to write them that a human
  reviewing the file would read correctly.

Three filters handle the places where the default is wrong:

- ``plain``: arguments nginx does not evaluate as scripts (``server_name``, ``listen``,
  ``location`` paths...): quoted like `token`, but a ``$`` is refused, because there
  ``${nxmesh_dollar}`` would be taken literally.
- ``regex``: a location regular expression; ``$`` is the end anchor there, not a
  variable, and is kept.
- ``redirect_url``: a redirect target; a trailing ``$request_uri`` (the one variable the
  model allows) stays a variable, any other ``$`` is escaped.

The filters return `Token`, a ``str`` that `token` passes through unchanged. Only this
module and the renderer's helpers create tokens, always from checked parts.
"""

from __future__ import annotations

import re
import unicodedata

from nxmesh.core.errors import NxMeshError

__all__ = [
    "DOLLAR_VARIABLE",
    "Token",
    "UnsafeValueError",
    "is_bare",
    "plain",
    "quote",
    "redirect_url",
    "regex",
    "token",
]

DOLLAR_VARIABLE = "nxmesh_dollar"
"""Name of the variable holding a literal ``$`` (defined in the base template)."""

_DOLLAR = "${" + DOLLAR_VARIABLE + "}"

# Characters nginx (and crossplane) read as part of a bare word anywhere in it. Excluded
# on purpose: whitespace ; { } (structure), " ' (quoting), \ (escape), $ (variables),
# # (comment), ( ) (``if`` conditions) and everything non-ASCII.
_BARE = re.compile(r"[A-Za-z0-9_./:*@+,=~!%^|?\[\]-]+", re.ASCII)
# Line and paragraph separators are category Z, not C, but break lines in editors.
_EXTRA_UNSAFE = frozenset("\u2028\u2029")
_REQUEST_URI = "$request_uri"


class UnsafeValueError(NxMeshError, ValueError):
    """A value cannot be written as a single safe nginx token."""


class Token(str):
    """A string already in nginx syntax; `token` writes it unchanged.

    Made only by this module's filters and the renderer's helpers, from checked parts.
    """

    __slots__ = ()


def _refuse_controls(value: str) -> None:
    # The fast path: printable ASCII is by far the common case.
    if value.isascii() and value.isprintable():
        return
    for ch in value:
        if ch in _EXTRA_UNSAFE or unicodedata.category(ch).startswith("C"):
            raise UnsafeValueError(
                f"value {value[:60]!r} contains the control character U+{ord(ch):04X}, "
                "which cannot be written safely into nginx configuration"
            )


def is_bare(value: str) -> bool:
    """True when `value` can be written without quotes."""
    return _BARE.fullmatch(value) is not None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def quote(value: str, *, dollar: str = _DOLLAR) -> Token:
    """`value` as one token: bare when possible, else double-quoted and escaped.

    A ``$`` becomes `dollar` (default ``${nxmesh_dollar}``).
    """
    if _BARE.fullmatch(value) is not None:  # bare words hold no control characters
        return Token(value)
    _refuse_controls(value)
    escaped = _escape(value)
    if "$" in escaped:
        escaped = escaped.replace("$", dollar)
    return Token(f'"{escaped}"')


def token(value: object) -> str:
    """The environment's ``finalize``: any interpolated value as one safe nginx token."""
    if type(value) is Token:
        return value
    if type(value) is str and _BARE.fullmatch(value) is not None:  # the common case, fast
        return value
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    from jinja2 import Undefined  # only jinja calls this: it is imported already

    if isinstance(value, Undefined):
        # StrictUndefined raises its own "'name' is undefined" here, the clearer message.
        return quote(str(value))
    raise UnsafeValueError(
        f"cannot write a {type(value).__name__} ({value!r:.60}) as an nginx token; "
        "render its items or attributes instead"
    )


def plain(value: object) -> Token:
    """A token for an argument nginx takes literally: ``$`` is refused, not escaped."""
    if type(value) is str and _BARE.fullmatch(value) is not None:  # the common case, fast
        return Token(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return Token(token(value))
    text = str(value)
    if "$" in text:
        raise UnsafeValueError(
            f"value {text[:60]!r} contains '$', which this nginx directive cannot express"
        )
    return quote(text)


def regex(value: object) -> Token:
    """A location regular expression: ``$`` is its end anchor and is kept as is."""
    if not isinstance(value, str):
        raise UnsafeValueError(f"a regular expression must be a string, got {value!r:.60}")
    _refuse_controls(value)
    # Always quoted: a bare regex could start with '~' or '=' and read as a modifier.
    return Token(f'"{_escape(value)}"')


def redirect_url(value: object) -> Token:
    """A redirect target; a trailing ``$request_uri`` stays a variable."""
    if not isinstance(value, str):
        raise UnsafeValueError(f"a redirect URL must be a string, got {value!r:.60}")
    _refuse_controls(value)
    head, tail = value, ""
    if value.endswith(_REQUEST_URI):
        head, tail = value[: -len(_REQUEST_URI)], _REQUEST_URI
    return Token(f'"{_escape(head).replace("$", _DOLLAR)}{tail}"')
