"""The ``[plugins.storage_postgres]`` settings section."""

from __future__ import annotations

import attrs

SECTION = "storage_postgres"
"""Name of the ``[plugins.storage_postgres]`` settings section."""


@attrs.frozen
class PostgresSettings:
    """Connection pool sizing; the database itself comes from the master's ``storage_url``."""

    pool_min_size: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    pool_max_size: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    connect_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
