"""access grants and webhook events

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "access_grants",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column("principal_type", sa.String(length=8), nullable=False, comment="'user' or 'org'"),
        sa.Column(
            "principal_id", sa.String(length=64), nullable=False, comment="Clerk user id or organization id"
        ),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "chatbot_id", "principal_type", "principal_id", name=op.f("pk_access_grants")
        ),
    )
    with op.batch_alter_table("access_grants", schema=None) as batch_op:
        batch_op.create_index("ix_access_grants_principal", ["principal_type", "principal_id"], unique=False)

    op.create_table(
        "webhook_events",
        sa.Column(
            "id", sa.String(length=128), nullable=False, comment="svix-id: a redelivery carries the same id"
        ),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )


def downgrade() -> None:

    op.drop_table("webhook_events")
    with op.batch_alter_table("access_grants", schema=None) as batch_op:
        batch_op.drop_index("ix_access_grants_principal")

    op.drop_table("access_grants")
