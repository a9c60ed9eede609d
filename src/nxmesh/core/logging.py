"""Structured logging for NxMesh applications: structlog on top of the standard library.

Libraries (the core, plugins) only *get* loggers with ``structlog.get_logger(name)``;
applications (``nxmesh master``, ``nxmesh agent``, the CLI) call `configure_logging` once
at startup. Records from the standard library (SQLAlchemy, Alembic, asyncio...) go through
the same processors, so every line has the same shape and the same secret redaction.

Redaction has two layers: a processor replaces the values of keys that look secret
(``password``, ``token``, ``master_key``, an ``Authorization`` header...) with ``***``,
and the rendered line has the password of any ``scheme://user:password@host`` URL and
the value of any secret-looking ``name=value`` pair (a libpq ``password=...``, a query
string's ``token=...``) replaced, which also covers exception messages and tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "REDACTED",
    "configure_logging",
    "is_secret_key",
    "redact_secrets",
    "redact_text",
    "redact_url_passwords",
    "shown_url",
]

LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
"""Accepted ``log_level`` values and the standard-library level each maps to."""

LOG_FORMATS = ("auto", "console", "json")
"""Accepted ``log_format`` values; ``auto`` is ``console`` in a terminal, ``json`` otherwise."""

REDACTED = "***"
"""What a redacted secret is replaced with, in logs and in ``nxmesh config show``."""

# Name parts that make a key secret when they end it: ``master_key``, ``access_token``,
# ``set_cookie``. Matching only the *last* part keeps identifiers such as ``key_id`` and
# ``token_id`` visible, which operators need when debugging key rotation.
_SECRET_TAILS = frozenset(
    {
        "key", "keys", "apikey", "token", "tokens", "secret", "secrets", "password",
        "passwords", "passwd", "pwd", "passphrase", "authorization", "cookie", "cookies",
        "credential", "credentials",
    }
)  # fmt: skip
# Words that make a key secret wherever they appear (``password_hash`` is not a secret
# and stays visible, but ``client_secret_value`` is).
_SECRET_ANYWHERE = ("secret", "password", "passwd", "authorization", "cookie")
_NOT_SECRET_TAILS = frozenset({"id", "ids", "name", "names", "file", "path", "hash", "url"})
_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")
# The password runs to the URL's last ``@``: it may hold ``/``, ``:``, an unencoded ``@``
# and spaces (SQLAlchemy accepts them), a space when the next word reaches an ``@``; it
# never runs into another URL (``://``). Hiding too much of an odd line beats showing
# part of a password.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/:@]*:)"
    r"(?:(?!://)\S|[ \t](?=(?:(?!://)\S)*@))+@"
)
# ``name=value`` in free text: libpq conninfo, query strings, `repr` of settings objects.
_PAIR = re.compile(
    r"""(?P<name>\b[A-Za-z][A-Za-z0-9_\-]*)=(?P<value>'[^']*'|"[^"]*"|[^\s&;,)'"]+)"""
)

_HANDLER_MARK = "_nxmesh_handler"


def is_secret_key(name: str) -> bool:
    """Whether a field or log key named `name` holds a secret (``api_key``, ``Cookie``...)."""
    parts = [p.lower() for p in _SPLIT.split(name) if p]
    if not parts:
        return False
    if parts[-1] in _NOT_SECRET_TAILS:
        return False
    if parts[-1] in _SECRET_TAILS:
        return True
    return any(word in part for part in parts for word in _SECRET_ANYWHERE)


def redact_url_passwords(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` URL in `text`."""
    return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)


def _redact_pair(match: re.Match[str]) -> str:
    name, value = match["name"], match["value"]
    if not is_secret_key(name):
        # Its value may hold pairs too: ``url=postgresql://db/x?password=...``.
        return f"{name}={_PAIR.sub(_redact_pair, value)}"
    if value.strip("'\"") in ("", REDACTED):
        return match[0]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{name}={quote}{REDACTED}{quote}"


def redact_text(text: str) -> str:
    """`redact_url_passwords`, and the value of every secret-looking ``name=value`` pair
    (``password=...``, ``api_key='...'``; ``key_id=...`` stays, see `is_secret_key`)."""
    return _PAIR.sub(_redact_pair, redact_url_passwords(text))


def shown_url(url: str) -> str:
    """`url` fit for a log line: its password hidden (whatever characters it holds, as
    SQLAlchemy parses it) and secret-looking query values too (``?password=...``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    # Not a URL SQLAlchemy reads: the text redaction below still applies.
    with contextlib.suppress(ArgumentError, ValueError):
        url = make_url(url).render_as_string(hide_password=True)
    return redact_text(url)


def _redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value("", v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace the values of secret-looking keys, recursively."""
    return {key: _redact_value(key, value) for key, value in event_dict.items()}


def _redact_rendered(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> Any:
    # Runs after the renderer: `event_dict` is the rendered line by now. Tracebacks and
    # exception messages are only text at this point, so URLs and pairs in them are
    # caught here.
    rendered: Any = event_dict
    if isinstance(rendered, str):
        return redact_text(rendered)
    return rendered


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "console", "json"] = "auto",
    *,
    stream: TextIO | None = None,
) -> None:
    """Send structlog and standard-library logs to `stream` (stderr) at `level`.

    :param level: one of `LOG_LEVELS` (case-insensitive).
    :param fmt: ``console`` (human, coloured in a terminal), ``json`` (one object per
        line) or ``auto``: console when `stream` is a terminal, JSON otherwise.
    :param stream: where lines go; standard error by default.

    Idempotent: calling it again replaces the previous configuration instead of adding a
    second handler. Handlers installed by others (pytest's ``caplog``) are left alone.
    Only applications call this; a library that configures logging steals that
    decision from the application embedding it.
    """
    numeric = LOG_LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(LOG_FORMATS)}")
    out = sys.stderr if stream is None else stream
    tty = _isatty(out)
    console = fmt == "console" or (fmt == "auto" and tty)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: list[Processor]
    if console:
        # Tracebacks are rendered as plain text first: rich's pretty tracebacks show
        # local variables (secrets) and colour or wrap URLs so no redaction can find them.
        renderer = [
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(
                colors=tty, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    else:
        renderer = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer,
            _redact_rendered,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers (``log = structlog.get_logger()``) must follow a later
        # reconfiguration, so they are not frozen on first use.
        cache_logger_on_first_use=False,
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False
