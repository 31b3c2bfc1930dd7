"""sync leases: the per-chatbot sync lock on PostgreSQL, without a server session

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_leases",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column(
            "holder",
            sa.String(length=36),
            nullable=False,
            comment="random id of this hold; only it renews or releases",
        ),
        sa.Column(
            "host",
            sa.String(length=255),
            nullable=False,
            comment="hostname of the holder, for people reading the table",
        ),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "pid_namespace",
            sa.String(length=100),
            nullable=True,
            comment="boot id and PID namespace of the holder: where its pid means the same process; NULL if unknown",
        ),
        sa.Column(
            "process_start",
            sa.BigInteger(),
            nullable=True,
            comment="holder's start in clock ticks after boot: tells a reused pid",
        ),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False, comment="database clock"),
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="database clock; renewed while the sync runs",
        ),
        sa.PrimaryKeyConstraint("chatbot_id", name=op.f("pk_sync_leases")),
    )


def downgrade() -> None:
    op.drop_table("sync_leases")
