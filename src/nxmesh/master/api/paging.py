"""Cursor pagination of list endpoints: ``?limit=`` and ``?cursor=``, the next page in a
``Link: <…>; rel="next"`` header (RFC 8288).

The body stays a JSON array, so a client that ignores the header still reads the first
page. A cursor is opaque to clients (URL-safe base64 of the last key served); the next
page seeks past that key in the primary-key order, so rows added or removed between
requests never make a page repeat or skip one that stayed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from litestar import Request
from litestar.datastructures import ResponseHeader
from litestar.params import Parameter

from nxmesh.core.errors import Problem, ValidationError

__all__ = [
    "DEFAULT_LIMIT",
    "LINK_HEADER",
    "MAX_LIMIT",
    "Cursor",
    "PageLimit",
    "decode_cursor",
    "encode_cursor",
    "next_link",
    "page_headers",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

PageLimit = Annotated[
    int,
    Parameter(
        ge=1,
        le=MAX_LIMIT,
        description=f"At most this many items (default {DEFAULT_LIMIT}, at most {MAX_LIMIT}).",
    ),
]
Cursor = Annotated[
    str | None,
    Parameter(
        max_length=400,
        description="Where the page starts: the cursor of the previous page's "
        '`Link: <…>; rel="next"` header (absent: the first page).',
    ),
]
LINK_HEADER: Final = ResponseHeader(
    name="Link",
    description='`<URL>; rel="next"` when there may be more items: the same request with the '
    "cursor of the next page. Absent on the last page.",
    documentation_only=True,
)


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, valid: Callable[[str], bool]) -> str:
    """The key in `cursor`; a 422 naming ``query.cursor`` when it is not one of ours."""
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        key = None
    if key is None or not valid(key):
        raise ValidationError(
            [Problem("query.cursor", "is not a cursor this list returned; start without one")]
        )
    return key


def next_link(request: Request[Any, Any, Any], params: Mapping[str, object]) -> str:
    """``<path?params>; rel="next"``: relative, so it holds behind any proxy or prefix."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f'<{request.url.path}?{query}>; rel="next"'


def page_headers(
    request: Request[Any, Any, Any],
    page: Sequence[Any],
    limit: int,
    params: Mapping[str, object],
) -> dict[str, str]:
    """The headers of `page` (items with an ``id``, the key the cursor seeks past): a
    ``Link`` to the next page, with `params` and the cursor after the last item, when
    the page is full — maybe more: an empty last page beats a COUNT per page."""
    if len(page) < limit:
        return {}
    return {"Link": next_link(request, {**params, "cursor": encode_cursor(page[-1].id)})}
