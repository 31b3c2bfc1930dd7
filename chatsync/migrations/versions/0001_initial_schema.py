"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "chatbots",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column(
            "first_day",
            sa.Date(),
            nullable=True,
            comment="first UTC day with a conversation, found on the first full sync",
        ),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chatbots")),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column(
            "user_id", sa.String(length=64), nullable=True, comment="owning Clerk user, when one is assigned"
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("customer", sa.Text(), nullable=True),
        sa.Column("country", sa.String(length=16), nullable=True),
        sa.Column("min_score", sa.Float(), nullable=True),
        sa.Column(
            "messages",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
            comment="the messages exactly as Chatbase sent them",
        ),
        sa.Column(
            "raw",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
            comment="every other field Chatbase sent",
        ),
        sa.Column("content_hash", sa.String(length=32), nullable=False),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("user_messages", sa.Integer(), nullable=False),
        sa.Column("assistant_messages", sa.Integer(), nullable=False),
        sa.Column("response_steps", sa.Integer(), nullable=False),
        sa.Column(
            "response_seconds",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
            comment="seconds of each timed user→assistant step",
        ),
        sa.Column("first_response_seconds", sa.Float(), nullable=True),
        sa.Column("unanswered", sa.Boolean(), nullable=False),
        sa.Column("wa_outcome", sa.String(length=16), nullable=False),
        sa.Column("wa_extracted", sa.String(length=20), nullable=True),
        sa.Column("wa_form", sa.String(length=20), nullable=True),
        sa.Column("wa_matched", sa.Text(), nullable=True),
        sa.Column(
            "wa_reasons",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("whatsapp_number", sa.String(length=20), nullable=True),
        sa.Column("whatsapp_source", sa.String(length=16), nullable=True),
        sa.Column("whatsapp_region", sa.String(length=4), nullable=True),
        sa.Column("first_synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_conversations_chatbot_created", ["chatbot_id", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_conversations_created", ["created_at", "id"], unique=False)
        batch_op.create_index("ix_conversations_source_created", ["source", "created_at"], unique=False)
        batch_op.create_index("ix_conversations_user_id", ["user_id"], unique=False)
        batch_op.create_index("ix_conversations_whatsapp_number", ["whatsapp_number"], unique=False)

    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column(
            "record_key",
            sa.String(length=160),
            nullable=False,
            comment="conversation id, or a hash of the record",
        ),
        sa.Column("conversation_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False, comment="the record as received, JSON-escaped"),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
        sa.UniqueConstraint("chatbot_id", "record_key", name=op.f("uq_quarantine_chatbot_id_record_key")),
    )
    op.create_table(
        "sync_days",
        sa.Column("chatbot_id", sa.String(length=128), nullable=False),
        sa.Column(
            "scope",
            sa.String(length=400),
            nullable=False,
            comment="'*' or the sorted sources the run filtered on",
        ),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column(
            "fetched_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when the fetch of this day began",
        ),
        sa.PrimaryKeyConstraint("chatbot_id", "scope", "day", name=op.f("pk_sync_days")),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column(
            "chatbot_ids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "summary",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=64), nullable=False, comment="Clerk user id"),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("first_name", sa.String(length=200), nullable=True),
        sa.Column("last_name", sa.String(length=200), nullable=True),
        sa.Column("image_url", sa.Text(), nullable=True),
        sa.Column("clerk_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("clerk_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_table(
        "whatsapp_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("by", sa.String(length=200), nullable=False),
        sa.Column("old", sa.String(length=20), nullable=True),
        sa.Column("new", sa.String(length=20), nullable=True),
        sa.Column("old_source", sa.String(length=16), nullable=True),
        sa.Column("new_source", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_whatsapp_audit_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_whatsapp_audit")),
    )
    with op.batch_alter_table("whatsapp_audit", schema=None) as batch_op:
        batch_op.create_index("ix_whatsapp_audit_conversation", ["conversation_id", "id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("whatsapp_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_whatsapp_audit_conversation")

    op.drop_table("whatsapp_audit")
    op.drop_table("users")
    op.drop_table("sync_runs")
    op.drop_table("sync_days")
    op.drop_table("quarantine")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_whatsapp_number")
        batch_op.drop_index("ix_conversations_user_id")
        batch_op.drop_index("ix_conversations_source_created")
        batch_op.drop_index("ix_conversations_created")
        batch_op.drop_index("ix_conversations_chatbot_created")

    op.drop_table("conversations")
    op.drop_table("chatbots")
