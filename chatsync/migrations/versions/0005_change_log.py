"""change log for the HTTP API's event streams

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column(
            "kind",
            sa.String(length=32),
            nullable=False,
            comment="'conversation.upserted' or 'sync.finished'",
        ),
        sa.Column(
            "subject", sa.String(length=128), nullable=False, comment="the conversation id or the sync run id"
        ),
        sa.Column(
            "chatbot_id",
            sa.String(length=128),
            nullable=True,
            comment="the conversation's chatbot; NULL for a sync run",
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_changes")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("changes")
