"""The master's SQL schema as SQLAlchemy Core tables: the one source the migrations match.

Portable types only, so one set of Alembic migrations serves SQLite and PostgreSQL:
timestamps are epoch seconds (double precision), structured values are canonical JSON
text, and secret columns are ``LargeBinary`` holding AES-GCM tokens (never plaintext).

A test compares this metadata with a database migrated to head (Alembic autogenerate);
any change here needs a new revision in `nxmesh.sql.migrations`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

__all__ = [
    "agent_keys",
    "agent_status",
    "agents",
    "assignments",
    "audit_log",
    "auth_api_tokens",
    "auth_login_failures",
    "auth_refresh_tokens",
    "bootstrap_tokens",
    "certificates",
    "config_states",
    "config_versions",
    "event_payloads",
    "metadata",
    "users",
]

# Named constraints: Alembic's batch mode (SQLite) can only alter what has a name.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite auto-assigns only an ``INTEGER PRIMARY KEY``; PostgreSQL wants a 64-bit serial.
_Serial = BigInteger().with_variant(Integer(), "sqlite")

config_states = Table(
    "config_states",
    metadata,
    # sha256 of `body`: a rollback to an old state stores no second copy.
    Column("sha256", Text, primary_key=True),
    Column("body", Text, nullable=False),
)

config_versions = Table(
    "config_versions",
    metadata,
    Column("workspace", Text, nullable=False),
    Column("number", BigInteger, nullable=False, autoincrement=False),
    Column("digest", Text, nullable=False),
    Column("parent_digest", Text),
    Column("author", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("state_sha256", Text, ForeignKey("config_states.sha256"), nullable=False),
    Column("signature", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    # The primary key is what makes two writers of the same number impossible.
    PrimaryKeyConstraint("workspace", "number"),
    Index(None, "workspace", "digest"),
)

agents = Table(
    "agents",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("labels", Text, nullable=False),
    Column("workspace", Text, nullable=False, index=True),
    Column("status", Text, nullable=False),
    Column("nginx_version", Text),
    Column("deployment_mode", Text),
    Column("running_version", BigInteger),
    Column("running_digest", Text),
    Column("last_seen", Float),
)

bootstrap_tokens = Table(
    "bootstrap_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("secret_hash", Text, nullable=False),
    Column("workspace", Text, nullable=False, index=True),
    Column("labels", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
    Column("revoked", Boolean, nullable=False),
)

agent_keys = Table(
    "agent_keys",
    metadata,
    Column("agent_id", Text, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", Text, nullable=False),
    Column("secret", LargeBinary, nullable=False),  # AES-GCM token
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("is_primary", Boolean, nullable=False),
    PrimaryKeyConstraint("agent_id", "key_id"),
)

assignments = Table(
    "assignments",
    metadata,
    Column("workspace", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("selector", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("workspace", "name"),
    # An assignment can only point at a version that exists in its own workspace.
    ForeignKeyConstraint(
        ["workspace", "version"], ["config_versions.workspace", "config_versions.number"]
    ),
)

certificates = Table(
    "certificates",
    metadata,
    Column("workspace", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("cert_pem", Text, nullable=False),
    Column("chain_pem", Text, nullable=False),
    Column("key_pem", LargeBinary, nullable=False),  # AES-GCM token
    Column("not_after", Float, nullable=False, index=True),
    Column("domains", Text, nullable=False),
    Column("source", Text, nullable=False),
    PrimaryKeyConstraint("workspace", "name"),
)

audit_log = Table(
    "audit_log",
    metadata,
    # Insertion order: clocks of several masters may disagree, the sequence does not.
    Column("seq", _Serial, primary_key=True, autoincrement=True),
    Column("id", Text, nullable=False, unique=True),
    Column("ts", Float, nullable=False, index=True),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("resource", Text, nullable=False),
    Column("remote_addr", Text),
    Column("details", Text, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("username", Text, primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("roles", Text, nullable=False),
    Column("disabled", Boolean, nullable=False),
)

agent_status = Table(
    "agent_status",
    metadata,
    Column("agent_id", Text, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("version", BigInteger, nullable=False, autoincrement=False),
    Column("digest", Text, nullable=False),
    Column("phase", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("ts", Float, nullable=False),
    PrimaryKeyConstraint("agent_id", "version"),
)

event_payloads = Table(
    "event_payloads",
    metadata,
    # Events too large for a NOTIFY payload (PostgreSQL event bus); pruned by age.
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("body", Text, nullable=False),
)

# -- the master's login sessions and API tokens (nxmesh.master.auth.store) -----------------
# Only sha256 hashes of the secrets; structured values (roles, scopes) are JSON text.

auth_refresh_tokens = Table(
    "auth_refresh_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("family", Text, nullable=False, index=True),
    Column("subject", Text, nullable=False, index=True),
    Column("authenticator", Text, nullable=False),
    Column("roles", Text, nullable=False),
    Column("secret_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
    Column("revoked", Boolean, nullable=False),
)

auth_api_tokens = Table(
    "auth_api_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("secret_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("last_used_at", Float),
    Column("revoked", Boolean, nullable=False),
)

# -- failed password logins (nxmesh.plugins.auth_password), shared by every master ----------
# Keyed like the in-memory counter: (username, client address). No secrets; times are
# epoch seconds. Rows idle for 2 x lockout_max_delay are stale and get pruned.

auth_login_failures = Table(
    "auth_login_failures",
    metadata,
    Column("username", Text, nullable=False),
    Column("remote_addr", Text, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("locked_until", Float, nullable=False),
    Column("last_failure", Float, nullable=False, index=True),
    PrimaryKeyConstraint("username", "remote_addr"),
)
