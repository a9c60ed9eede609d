"""Refresh and API token tables of the master's auth, under Alembic.

Masters before this revision created both tables themselves at start (outside the
migrations, with the same columns and index names): such tables are adopted as they
are, and only missing ones are created.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "auth_refresh_tokens" not in existing:
        op.create_table(
            "auth_refresh_tokens",
            sa.Column("id", sa.Text(), nullable=False),
            sa.Column("family", sa.Text(), nullable=False),
            sa.Column("subject", sa.Text(), nullable=False),
            sa.Column("authenticator", sa.Text(), nullable=False),
            sa.Column("roles", sa.Text(), nullable=False),
            sa.Column("secret_hash", sa.Text(), nullable=False),
            sa.Column("created_at", sa.Float(), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
            sa.Column("used_at", sa.Float(), nullable=True),
            sa.Column("revoked", sa.Boolean(), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_refresh_tokens")),
        )
        op.create_index(op.f("ix_auth_refresh_tokens_family"), "auth_refresh_tokens", ["family"])
        op.create_index(op.f("ix_auth_refresh_tokens_subject"), "auth_refresh_tokens", ["subject"])
    if "auth_api_tokens" not in existing:
        op.create_table(
            "auth_api_tokens",
            sa.Column("id", sa.Text(), nullable=False),
            sa.Column("owner", sa.Text(), nullable=False),
            sa.Column("name", sa.Text(), nullable=False),
            sa.Column("scopes", sa.Text(), nullable=False),
            sa.Column("secret_hash", sa.Text(), nullable=False),
            sa.Column("created_at", sa.Float(), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=True),
            sa.Column("last_used_at", sa.Float(), nullable=True),
            sa.Column("revoked", sa.Boolean(), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_api_tokens")),
        )
        op.create_index(op.f("ix_auth_api_tokens_owner"), "auth_api_tokens", ["owner"])


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_api_tokens_owner"), table_name="auth_api_tokens")
    op.drop_table("auth_api_tokens")
    op.drop_index(op.f("ix_auth_refresh_tokens_subject"), table_name="auth_refresh_tokens")
    op.drop_index(op.f("ix_auth_refresh_tokens_family"), table_name="auth_refresh_tokens")
    op.drop_table("auth_refresh_tokens")
