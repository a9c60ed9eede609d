"""`PostgresStorage`: the shared SQL storage on PostgreSQL through psycopg 3.

URLs are ``postgresql://user:password@host:5432/dbname`` (``postgres://`` works too);
they are driven by SQLAlchemy's ``postgresql+psycopg`` dialect with a `QueuePool` sized
by the ``[plugins.storage_postgres]`` settings. Migrations are the same Alembic revisions
SQLite uses; several masters starting at once serialise on an advisory lock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool

from nxmesh.core.records import StorageError
from nxmesh.sql.backend import SqlStorage
from nxmesh.sql.migrations import upgrade_to_head
from nxmesh_storage_postgres.settings import SECTION, PostgresSettings

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings
    from nxmesh.crypto.secrets import MasterKeyring

__all__ = ["SECTION", "PostgresStorage", "create_pg_engine", "psycopg_url", "settings_section"]

APPLICATION_NAME = "nxmesh-master"
"""Name of the settings section (``[plugins.storage_postgres]``)."""


def psycopg_url(url: str) -> URL:
    """`url` with the ``postgresql+psycopg`` driver, whatever PostgreSQL scheme it had."""
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise StorageError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)!r}")
    return parsed.set(drivername="postgresql+psycopg")


def create_pg_engine(
    url: str, settings: PostgresSettings, *, pool_size: int | None = None
) -> Engine:
    """A psycopg 3 engine with a bounded, pre-pinged connection pool.

    `settings.pool_max_size` connections at most (no overflow, so the database's
    ``max_connections`` budget per master is predictable); a checkout waits up to
    `settings.connect_timeout` for a free one.
    """
    target = psycopg_url(url)
    connect_args: dict[str, object] = {
        "connect_timeout": max(1, math.ceil(settings.connect_timeout))
    }
    if "application_name" not in target.query:
        connect_args["application_name"] = APPLICATION_NAME
    return create_engine(
        target,
        poolclass=QueuePool,
        pool_size=pool_size or settings.pool_max_size,
        max_overflow=0,
        pool_timeout=settings.connect_timeout,
        # A master outlives database restarts and failovers: test before handing out.
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def settings_section(settings: Settings) -> PostgresSettings:
    """Our settings section, or the defaults when the plugin's section is not loaded."""
    section = settings.plugins.get(SECTION)
    return section if isinstance(section, PostgresSettings) else PostgresSettings()


class PostgresStorage(SqlStorage):
    """`SqlStorage` on PostgreSQL; the source of truth shared by several masters."""

    name: ClassVar[str] = "postgres"
    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")

    def __init__(
        self,
        url: str,
        *,
        keyring: MasterKeyring | None = None,
        settings: PostgresSettings | None = None,
    ) -> None:
        super().__init__(url, keyring=keyring)
        self.settings = settings or PostgresSettings()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, keyring: MasterKeyring | None = None
    ) -> PostgresStorage:
        """The backend for ``storage_url``, pool sized by ``[plugins.storage_postgres]``."""
        return cls(
            settings.effective_storage_url(), keyring=keyring, settings=settings_section(settings)
        )

    def _create_engine(self) -> Engine:
        return create_pg_engine(self.url, self.settings)

    def _migrate(self, engine: Engine) -> bool:
        shown = psycopg_url(self.url).render_as_string(hide_password=True)
        try:
            migrated = upgrade_to_head(engine)
            # Open the pool's minimum now, so the first requests do not pay for connects.
            warm = [engine.connect() for _ in range(self.settings.pool_min_size)]
            for conn in warm:
                conn.close()
        except OperationalError as exc:
            reason = str(exc.orig).strip() if exc.orig is not None else str(exc)
            raise StorageError(f"cannot connect to PostgreSQL at {shown}: {reason}") from None
        return migrated
