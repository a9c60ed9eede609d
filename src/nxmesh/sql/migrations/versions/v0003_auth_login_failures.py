"""Failed password logins per (username, client address), so every master on one database
shares the login lockout and a restart does not forget it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_login_failures",
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("remote_addr", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=False),
        sa.Column("last_failure", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("username", "remote_addr", name=op.f("pk_auth_login_failures")),
    )
    op.create_index(
        op.f("ix_auth_login_failures_last_failure"), "auth_login_failures", ["last_failure"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_login_failures_last_failure"), table_name="auth_login_failures")
    op.drop_table("auth_login_failures")
