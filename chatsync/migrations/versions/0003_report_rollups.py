"""report rollups, filled from the conversations already stored

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_hours",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column(
            "hour",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="UTC hour the conversations were created in",
        ),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("user_messages", sa.Integer(), nullable=False),
        sa.Column("assistant_messages", sa.Integer(), nullable=False),
        sa.Column("keyed", sa.Integer(), nullable=False),
        sa.Column("engaged", sa.Integer(), nullable=False),
        sa.Column("with_steps", sa.Integer(), nullable=False),
        sa.Column("with_pairs", sa.Integer(), nullable=False),
        sa.Column("with_first", sa.Integer(), nullable=False),
        sa.Column("unanswered", sa.Integer(), nullable=False),
        sa.Column("prompted", sa.Integer(), nullable=False),
        sa.Column("replied", sa.Integer(), nullable=False),
        sa.Column("captured", sa.Integer(), nullable=False),
        sa.Column("manual", sa.Integer(), nullable=False),
        sa.Column("from_form", sa.Integer(), nullable=False),
        sa.Column("with_number", sa.Integer(), nullable=False),
        sa.Column("missed_no_reply", sa.Integer(), nullable=False),
        sa.Column("missed_not_found", sa.Integer(), nullable=False),
        sa.Column("missed_ambiguous", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("chatbot_id", "source", "hour", name=op.f("pk_report_hours")),
    )
    op.create_table(
        "report_users",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column(
            "user_key",
            sa.String(length=32),
            nullable=False,
            comment="hash of the WhatsApp number or customer",
        ),
        sa.Column("n", sa.Integer(), nullable=False, comment="conversations with this key"),
        sa.PrimaryKeyConstraint("chatbot_id", "source", "user_key", name=op.f("pk_report_users")),
    )
    op.create_table(
        "report_values",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column(
            "metric",
            sa.String(length=16),
            nullable=False,
            comment="length, country, region, response, first_response",
        ),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("chatbot_id", "source", "metric", "value", name=op.f("pk_report_values")),
    )
    # Existing databases get their rollups from the newest migration that changes what they hold (0007),
    # once every column the code's rebuild writes exists.


def downgrade() -> None:
    op.drop_table("report_values")
    op.drop_table("report_users")
    op.drop_table("report_hours")
