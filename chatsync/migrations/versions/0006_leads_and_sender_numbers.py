"""leads, the WhatsApp sender's number and lead phone on conversations, and their report counters

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column(
            "chatbase_id", sa.String(length=128), nullable=True, comment="the get-leads row's id (backfill)"
        ),
        sa.Column(
            "delivery",
            sa.String(length=64),
            nullable=True,
            comment="hash of the webhook's event: a redelivery carries the same",
        ),
        sa.Column(
            "conversation_id",
            sa.String(length=128),
            nullable=True,
            comment="from the webhook; get-leads rows carry none",
        ),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("phone", sa.Text(), nullable=True, comment="as the user typed it"),
        sa.Column(
            "number",
            sa.String(length=20),
            nullable=True,
            comment="E.164 of phone by the WhatsApp rule, else NULL",
        ),
        sa.Column(
            "submitted_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="Chatbase's created_at, else when the webhook came",
        ),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "raw",
            sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql"),
            nullable=False,
            comment="the webhook payload or get-leads row as received",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leads")),
        sa.UniqueConstraint("chatbot_id", "chatbase_id", name=op.f("uq_leads_chatbot_id_chatbase_id")),
        sa.UniqueConstraint("delivery", name=op.f("uq_leads_delivery")),
    )
    op.create_index("ix_leads_chatbot_submitted", "leads", ["chatbot_id", "submitted_at"], unique=False)
    op.create_index("ix_leads_conversation_id", "leads", ["conversation_id"], unique=False)
    op.add_column(
        "conversations",
        sa.Column(
            "wa_channel",
            sa.String(length=20),
            nullable=True,
            comment="the WhatsApp sender's own number, on WhatsApp conversations",
        ),
    )
    op.add_column(
        "conversations",
        sa.Column(
            "wa_lead",
            sa.String(length=20),
            nullable=True,
            comment="the phone of the conversation's latest lead form",
        ),
    )
    # No stored number has these sources yet, so 0 is every existing rollup row's exact count.
    for counter in ("from_channel", "from_lead"):
        op.add_column("report_hours", sa.Column(counter, sa.Integer(), nullable=False, server_default="0"))

    # Existing databases get their rollups from the newest migration that changes what they hold (0007),
    # once every column the code's rebuild reads and writes exists.


def downgrade() -> None:
    for counter in ("from_lead", "from_channel"):
        with op.batch_alter_table("report_hours") as batch_op:
            batch_op.drop_column(counter)
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.drop_column("wa_lead")
        batch_op.drop_column("wa_channel")
    op.drop_index("ix_leads_conversation_id", table_name="leads")
    op.drop_index("ix_leads_chatbot_submitted", table_name="leads")
    op.drop_table("leads")
