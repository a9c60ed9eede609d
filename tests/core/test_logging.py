"""Logging: JSON or console lines, context variables, and no secret ever written out."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from nxmesh.core.logging import (
    configure_logging,
    is_secret_key,
    redact_text,
    redact_url_passwords,
)


class TTYStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test leaves structlog, the root logger and context variables as it found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestFormat:
    def test_json_when_not_a_terminal(self, stream: io.StringIO) -> None:
        """auto renders one JSON object per line with ISO timestamp, level and logger name."""
        configure_logging("info", "auto", stream=stream)
        structlog.get_logger("nxmesh.test").info("agent connected", agent_id="a1")
        [line] = lines(stream)
        assert line["event"] == "agent connected"
        assert line["agent_id"] == "a1"
        assert line["level"] == "info"
        assert line["logger"] == "nxmesh.test"
        assert datetime.fromisoformat(line["timestamp"]).tzinfo is not None

    def test_console_in_a_terminal(self) -> None:
        """auto renders human-readable lines when the stream is a terminal."""
        tty = TTYStream()
        configure_logging("info", "auto", stream=tty)
        structlog.get_logger("nxmesh.test").info("agent connected", agent_id="a1")
        text = tty.getvalue()
        assert "agent connected" in text
        assert "a1" in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

    def test_level_filters(self, stream: io.StringIO) -> None:
        """Events below the configured level are dropped, for structlog and stdlib alike."""
        configure_logging("warning", "json", stream=stream)
        log = structlog.get_logger("nxmesh.test")
        log.info("quiet")
        logging.getLogger("other.lib").info("quiet too")
        log.warning("loud")
        assert [line["event"] for line in lines(stream)] == ["loud"]

    def test_stdlib_records_share_the_format(self, stream: io.StringIO) -> None:
        """Records from libraries using the logging module come out as the same JSON."""
        configure_logging("info", "json", stream=stream)
        logging.getLogger("sqlalchemy.engine").warning("pool %s exhausted", "main")
        [line] = lines(stream)
        assert line["event"] == "pool main exhausted"
        assert line["logger"] == "sqlalchemy.engine"

    def test_context_variables_are_merged(self, stream: io.StringIO) -> None:
        """Values bound with bind_contextvars (request ids) appear on every line."""
        configure_logging("info", "json", stream=stream)
        structlog.contextvars.bind_contextvars(request_id="r-42")
        structlog.get_logger("nxmesh.test").info("handled")
        assert lines(stream)[0]["request_id"] == "r-42"

    def test_idempotent(self, stream: io.StringIO) -> None:
        """Configuring twice replaces the handler instead of writing every line twice."""
        configure_logging("info", "json", stream=io.StringIO())
        configure_logging("info", "json", stream=stream)
        structlog.get_logger("nxmesh.test").info("once")
        assert len(lines(stream)) == 1

    def test_loggers_created_before_configuration_follow_it(self, stream: io.StringIO) -> None:
        """A module-level logger obtained earlier uses the configuration made later."""
        early = structlog.get_logger("nxmesh.early")
        early.info("before")  # goes to structlog's default output, not our stream
        configure_logging("info", "json", stream=stream)
        early.info("after")
        assert [line["event"] for line in lines(stream)] == ["after"]

    @pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
    def test_bad_arguments_are_refused(self, level: str, fmt: Any) -> None:
        """An unknown level or format raises instead of silently logging everything."""
        with pytest.raises(ValueError, match="unknown log"):
            configure_logging(level, fmt, stream=io.StringIO())


class TestRedaction:
    def test_secret_keys_are_masked(self, stream: io.StringIO) -> None:
        """Passwords, tokens, keys, Authorization and cookies never reach the output."""
        configure_logging("info", "json", stream=stream)
        structlog.get_logger("nxmesh.test").info(
            "login",
            password="hunter2",
            master_key="k3y-material",
            headers={"Authorization": "Bearer abc.def", "Accept": "text/html"},
            cookies=["session=xyz"],
            key_id="k1",
            token_id="t1",
        )
        output = stream.getvalue()
        for secret in ("hunter2", "k3y-material", "abc.def", "session=xyz"):
            assert secret not in output
        [line] = lines(stream)
        assert line["password"] == "***"
        assert line["headers"] == {"Authorization": "***", "Accept": "text/html"}
        assert (line["key_id"], line["token_id"]) == ("k1", "t1")

    def test_url_passwords_are_masked_everywhere(self, stream: io.StringIO) -> None:
        """A password inside a URL is masked in values, messages and stdlib records."""
        configure_logging("info", "json", stream=stream)
        structlog.get_logger("nxmesh.test").info("connecting", url="postgresql://nx:pa55@db/nx")
        logging.getLogger("alembic").info("using %s", "postgresql://nx:pa55@db/nx")
        output = stream.getvalue()
        assert "pa55" not in output
        assert output.count("postgresql://nx:***@db/nx") == 2

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_tracebacks_leak_no_secrets(self, fmt: Any) -> None:
        """Exception messages are masked and local variables are not shown."""
        out = TTYStream() if fmt == "console" else io.StringIO()
        configure_logging("info", fmt, stream=out)
        local_secret = "s3cr3t-in-a-local"
        try:
            raise ConnectionError("cannot reach postgresql://nx:pa55@db/nx")
        except ConnectionError:
            structlog.get_logger("nxmesh.test").exception("storage down")
        output = out.getvalue()
        assert "ConnectionError" in output
        assert "pa55" not in output
        assert local_secret not in output

    @pytest.mark.parametrize(
        ("name", "secret"),
        [
            ("password", True),
            ("api_key", True),
            ("apiKey", True),
            ("access_token", True),
            ("Set-Cookie", True),
            ("client_secret_value", True),
            ("authorization", True),
            ("key_id", False),
            ("token_id", False),
            ("password_file", False),
            ("monkey", False),
            ("agent_id", False),
        ],
    )
    def test_is_secret_key(self, name: str, secret: bool) -> None:
        """Names ending in a secret word are secrets; identifiers and paths are not."""
        assert is_secret_key(name) is secret

    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("postgresql://nx:ab/cd@db/x", "postgresql://nx:***@db/x"),
            ("postgresql://nx:pa ss@db:5432/x", "postgresql://nx:***@db:5432/x"),
            ("postgresql://nx:p@ss:w/rd@db/x", "postgresql://nx:***@db/x"),
        ],
    )
    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_url_passwords_with_slashes_spaces_and_ats(
        self, url: str, shown: str, fmt: Any
    ) -> None:
        """SQLAlchemy takes ``/``, a space and ``@`` in a URL's password as they are: none
        of it reaches the log, in a value, a message or an exception."""
        out = io.StringIO()
        configure_logging("info", fmt, stream=out)
        log = structlog.get_logger("nxmesh.test")
        log.info("master services ready", event_bus=url)
        log.info(f"connecting to {url} now")
        try:
            raise ConnectionError(f"cannot reach {url}")
        except ConnectionError:
            log.exception("storage down")
        output = out.getvalue()
        for part in ("ab/cd", "pa ss", "p@ss", "w/rd", "cd@", "ss@", "rd@"):
            assert part not in output
        assert output.count(shown) == 3

    def test_urls_on_one_line_are_masked_apart(self) -> None:
        """The password of one URL never swallows another URL, nor text without an ``@``."""
        line = "a=postgresql://u:p@h/x,b=postgresql://u2:p/2@h2/y c=http://h:80/z by bob@x"
        assert redact_url_passwords(line) == (
            "a=postgresql://u:***@h/x,b=postgresql://u2:***@h2/y c=http://h:80/z by bob@x"
        )

    def test_redact_url_passwords_keeps_the_rest(self) -> None:
        """Only the password part of a URL changes; URLs without one are untouched."""
        assert redact_url_passwords("a wss://u:p@h:1/x b") == "a wss://u:***@h:1/x b"
        assert redact_url_passwords("https://h/x?a=b") == "https://h/x?a=b"

    @pytest.mark.parametrize(
        ("text", "redacted"),
        [
            ("host=db password=hunter2 user=nx", "host=db password=*** user=nx"),
            ("GET /x?token=abc&page=2", "GET /x?token=***&page=2"),
            ("Settings(api_key='s3cr3t', key_id='k1')", "Settings(api_key='***', key_id='k1')"),
            ('boom password="a b" end', 'boom password="***" end'),
            ("a wss://u:p@h:1/x b", "a wss://u:***@h:1/x b"),
            ("key_id=abc token_id=t1 path=/x", "key_id=abc token_id=t1 path=/x"),
            ("password=*** secret=", "password=*** secret="),
            ("url=postgresql://db/x?password=hunter2", "url=postgresql://db/x?password=***"),
        ],
    )
    def test_redact_text_pairs_and_urls(self, text: str, redacted: str) -> None:
        """Secret-looking ``name=value`` pairs (conninfo, query strings, reprs) and URL
        passwords; identifiers and already-redacted values stay."""
        assert redact_text(text) == redacted

    def test_exception_text_is_redacted_in_both_formats(self) -> None:
        """An exception whose message carries a libpq-style password is logged without it."""
        for fmt in ("json", "console"):
            out = io.StringIO()
            configure_logging("info", fmt, stream=out)  # type: ignore[arg-type]
            try:
                raise ValueError("connect failed: host=db password=hunter2")
            except ValueError:
                structlog.get_logger("t").exception("failed")
            assert "connect failed" in out.getvalue()
            assert "hunter2" not in out.getvalue(), fmt
