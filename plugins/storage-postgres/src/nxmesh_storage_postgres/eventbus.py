"""`PostgresEventBus`: events shared by every master on one database, via LISTEN/NOTIFY.

Publishing is ``SELECT pg_notify(channel, payload)`` in its own transaction, payload the
canonical JSON of the `Event`. PostgreSQL caps a payload at 8000 bytes, so a larger
event is stored in the ``event_payloads`` table and the notification carries only its
id (``{"$ref": id}``); rows older than an hour are pruned on the next large publish.

Receiving uses one dedicated psycopg connection per bus in a plain thread (``notifies``
is blocking), which hands events to the event loop through
``anyio.from_thread.run_sync`` — the bus works on asyncio and trio. The thread is
started by `open` and joined by `aclose`.

Subscriptions start exactly where they say: `subscribe` sends a private marker
notification and activates the subscriber when the listener sees it, so events committed
before are never replayed and events after are never missed (PostgreSQL delivers
notifications in commit order). If the listening connection drops, every current
subscription ends (its iterator stops, like a slow subscriber on the memory bus): the
subscriber must resubscribe and resync, since events may have been missed meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import psycopg
import structlog
from anyio.streams.memory import MemoryObjectSendStream
from psycopg import sql
from sqlalchemy import Engine, delete, insert, select, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from nxmesh.core.errors import NxMeshError
from nxmesh.core.events import Event
from nxmesh.core.records import StorageError
from nxmesh.core.serialization import canonical_json, structure
from nxmesh.sql import tables as t
from nxmesh.sql.migrations import upgrade_to_head
from nxmesh_storage_postgres.backend import create_pg_engine, psycopg_url, settings_section
from nxmesh_storage_postgres.settings import PostgresSettings

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

__all__ = ["LISTENER_APPLICATION_NAME", "MAX_NOTIFY_BYTES", "PostgresEventBus"]

log = structlog.get_logger("nxmesh.eventbus.postgres")

MAX_NOTIFY_BYTES = 7900
"""Largest payload sent inline; PostgreSQL's limit is 8000 bytes (with some headroom)."""

LISTENER_APPLICATION_NAME = "nxmesh-eventbus-listener"
"""``application_name`` of the listening connection (visible in ``pg_stat_activity``)."""

_PAYLOAD_RETENTION = 3600.0
_POLL = 5.0  # the listener also checks its stop flag this often; `aclose` wakes it at once
_SendStream = MemoryObjectSendStream[Event]


class PostgresEventBus:
    """Delivers each published event to every subscriber of every bus on the database."""

    name: ClassVar[str] = "postgres"
    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")

    def __init__(
        self,
        url: str,
        *,
        channel: str = "nxmesh_events",
        settings: PostgresSettings | None = None,
        buffer: int = 1024,
    ) -> None:
        self.url = url
        self.channel = channel
        self.settings = settings or PostgresSettings()
        self._buffer = buffer
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._failure: str | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        # Touched only on the event loop (the listener thread goes through `_in_loop`).
        self._subscribers: set[_SendStream] = set()
        self._pending: dict[str, tuple[_SendStream, anyio.Event]] = {}
        # A private channel `aclose` notifies to wake the blocked listener thread.
        self._wake_channel = f"nxmesh_wake_{uuid.uuid4().hex}"

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresEventBus:
        """The bus for ``event_bus_url``, pool sized by ``[plugins.storage_postgres]``."""
        return cls(settings.event_bus_url, settings=settings_section(settings))

    def __repr__(self) -> str:
        return f"PostgresEventBus({psycopg_url(self.url).render_as_string(hide_password=True)!r})"

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, make sure the payload table exists, and start listening."""
        if self._thread is not None:
            return
        self._token = anyio.lowlevel.current_token()
        engine = await anyio.to_thread.run_sync(self._connect)
        self._engine = engine
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._listen_forever, name=f"nxmesh-eventbus-{self.channel}", daemon=True
        )
        self._thread.start()
        try:
            await self._wait_listening()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    def _connect(self) -> Engine:
        engine = create_pg_engine(self.url, self.settings)
        try:
            upgrade_to_head(engine)  # the payload table is part of the shared schema
        except OperationalError as exc:
            engine.dispose()
            raise StorageError(f"{self!r}: cannot connect: {exc.orig}") from None
        return engine

    async def aclose(self) -> None:
        """Stop listening, end every subscription and release the connections."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            await anyio.to_thread.run_sync(self._wake_listener)
            await anyio.to_thread.run_sync(thread.join)
        self._end_subscriptions()
        engine, self._engine = self._engine, None
        if engine is not None:
            await anyio.to_thread.run_sync(engine.dispose)

    def _wake_listener(self) -> None:
        if self._engine is None or not self._listening.is_set():
            return  # not blocked in `notifies`: it sees the stop flag on its own
        try:
            with self._engine.begin() as conn:
                conn.execute(text("SELECT pg_notify(:c, '')"), {"c": self._wake_channel})
        except SQLAlchemyError:
            pass  # the listener still stops within its poll interval

    async def _wait_listening(self) -> None:
        with anyio.move_on_after(self.settings.connect_timeout):
            while not self._listening.is_set():
                if self._thread is None or not self._thread.is_alive():
                    break
                await anyio.sleep(0.01)
            else:
                return
        raise StorageError(
            f"{self!r} is not listening: {self._failure or 'timed out waiting for the listener'}"
        )

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        body = canonical_json(event).decode("utf-8")
        await anyio.to_thread.run_sync(self._publish_sync, body)

    def _publish_sync(self, body: str) -> None:
        engine = self._require_engine()
        with engine.begin() as conn:
            payload = body
            if len(body.encode("utf-8")) > MAX_NOTIFY_BYTES:
                now = time.time()
                ref = conn.execute(
                    insert(t.event_payloads)
                    .values(created_at=now, body=body)
                    .returning(t.event_payloads.c.id)
                ).scalar_one()
                conn.execute(
                    delete(t.event_payloads).where(
                        t.event_payloads.c.created_at < now - _PAYLOAD_RETENTION
                    )
                )
                payload = json.dumps({"$ref": ref})
            # Delivered at commit, together with the payload row it may point to.
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": self.channel, "payload": payload},
            )

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise StorageError(f"{self!r} is not open")
        return self._engine

    # -- subscribing ---------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        self._require_engine()
        await self._wait_listening()
        send, receive = anyio.create_memory_object_stream[Event](self._buffer)
        marker = uuid.uuid4().hex
        activated = anyio.Event()
        self._pending[marker] = (send, activated)
        try:
            await anyio.to_thread.run_sync(self._notify_marker, marker)
            with anyio.fail_after(self.settings.connect_timeout):
                await activated.wait()
        except BaseException:
            self._pending.pop(marker, None)
            send.close()
            receive.close()
            raise
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    def _notify_marker(self, marker: str) -> None:
        with self._require_engine().begin() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": self.channel, "payload": json.dumps({"$sync": marker})},
            )

    # -- on the event loop ---------------------------------------------------------------

    def _activate(self, marker: str) -> None:
        entry = self._pending.pop(marker, None)
        if entry is not None:  # markers of other buses on the channel are not ours
            send, activated = entry
            self._subscribers.add(send)
            activated.set()

    def _fan_out(self, event: Event) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                log.warning("slow subscriber disconnected", buffer=self._buffer)
                self._subscribers.discard(send)
                send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(send)

    def _end_subscriptions(self) -> None:
        for send in list(self._subscribers):
            send.close()
        self._subscribers.clear()
        for send, activated in self._pending.values():
            send.close()  # the subscriber gets an iterator that ends at once
            activated.set()
        self._pending.clear()

    # -- the listener thread -------------------------------------------------------------

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        anyio.from_thread.run_sync(fn, *args, token=self._token)

    def _listen_forever(self) -> None:
        conninfo = psycopg_url(self.url).set(drivername="postgresql")
        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    conninfo.render_as_string(hide_password=False),
                    autocommit=True,
                    connect_timeout=max(1, int(self.settings.connect_timeout)),
                    application_name=LISTENER_APPLICATION_NAME,
                ) as conn:
                    for channel in (self.channel, self._wake_channel):
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if self._failure is not None:
                        log.info("event bus listener reconnected")
                    self._failure = None
                    self._listening.set()
                    delay = 0.1
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=_POLL):
                            if notify.channel == self._wake_channel:
                                break
                            try:
                                self._dispatch(notify.payload)
                            except (ValueError, KeyError, NxMeshError, SQLAlchemyError) as exc:
                                # Another writer on the channel, or an expired payload: one
                                # bad notification must not stop the listener.
                                log.warning("ignoring undecodable event", error=str(exc))
            except psycopg.Error as exc:
                # Once per outage: a database down for an hour would log every retry.
                report = log.warning if self._failure is None else log.debug
                self._failure = str(exc).strip() or type(exc).__name__
                report("event bus listener lost its connection; reconnecting",
                       error=self._failure)  # fmt: skip
            except RuntimeError:
                return  # the event loop is gone (closed without aclose)
            if self._listening.is_set():
                self._listening.clear()
                try:
                    self._in_loop(self._end_subscriptions)
                except RuntimeError:
                    return
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _dispatch(self, payload: str) -> None:
        data = json.loads(payload)
        if "$sync" in data:
            self._in_loop(self._activate, data["$sync"])
            return
        if "$ref" in data:
            with self._require_engine().connect() as conn:
                body = conn.execute(
                    select(t.event_payloads.c.body).where(t.event_payloads.c.id == data["$ref"])
                ).scalar_one_or_none()
            if body is None:
                log.warning("large event payload expired before it was read", ref=data["$ref"])
                return
            data = json.loads(body)
        event = structure(data, Event, source="event bus")
        self._in_loop(self._fan_out, event)
