"""Alembic environment: runs the revisions on a given connection, or from the CLI on a URL.

Programmatic use (`nxmesh.sql.migrations.upgrade_to_head`) passes an open connection in
``config.attributes["connection"]`` inside a transaction it owns. The CLI (developers
writing a revision) connects to ``-x url=...`` or the ``sqlalchemy.url`` of the ini file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from nxmesh.sql.tables import metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead and is a
        # plain ALTER on PostgreSQL, so one revision serves both.
        render_as_batch=True,
        compare_type=True,
        # Both databases have transactional DDL: a failed upgrade rolls back completely.
        transactional_ddl=True,
    )


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give a database URL: alembic -x url=sqlite:///scratch.db ...")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; migrate a scratch database")
run()
