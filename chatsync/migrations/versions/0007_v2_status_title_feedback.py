"""what the API v2 export brings: conversation status, title, Chatbase's userId, answers' feedback counts,
and their report counters

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COUNTERS = (
    "with_status",
    "taken_over",
    "with_feedback",
    "answers_feedback_known",
    "answers_rated_up",
    "answers_rated_down",
)


def upgrade() -> None:
    columns: list[sa.Column[object]] = [
        sa.Column(
            "status",
            sa.String(length=32),
            nullable=True,
            comment="Chatbase's status: ongoing, ended, taken_over or paused",
        ),
        sa.Column(
            "title", sa.String(length=1000), nullable=True, comment="Chatbase's title of the conversation"
        ),
        sa.Column(
            "chatbase_user_id",
            sa.String(length=256),
            nullable=True,
            comment="Chatbase's userId (the chatbot site's user; not Clerk's)",
        ),
        sa.Column(
            "answers_feedback_known",
            sa.Integer(),
            nullable=True,
            comment="answers carrying feedback, rated or not; NULL: none",
        ),
        sa.Column(
            "answers_rated_up",
            sa.Integer(),
            nullable=True,
            comment="answers with feedback positive; NULL when none is known",
        ),
        sa.Column(
            "answers_rated_down",
            sa.Integer(),
            nullable=True,
            comment="answers with feedback negative; NULL when none is known",
        ),
    ]
    for column in columns:
        op.add_column("conversations", column)
    # No stored conversation carries these yet (they are read from API v2 records from this version on),
    # so 0 is every existing rollup row's exact count.
    for counter in COUNTERS:
        op.add_column("report_hours", sa.Column(counter, sa.Integer(), nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "postgresql":  # SQLite keeps no comments
        op.alter_column(
            "report_values",
            "metric",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            comment="length, country, region, response, first_response, status",
            existing_comment="length, country, region, response, first_response",
        )

    # The rollups are filled here, not where they were created (0003): a rebuild writes the rollups this
    # code declares, so it runs once every column exists. Empty rollups beside stored conversations mean
    # the database came from before 0003; rollups kept by writes since then are already exact.
    bind = op.get_bind()
    empty = bind.execute(sa.text("SELECT 1 FROM report_hours LIMIT 1")).first() is None
    if empty and bind.execute(sa.text("SELECT 1 FROM conversations LIMIT 1")).first() is not None:
        from chatsync.store.rollups import rebuild

        rebuild(bind)


def downgrade() -> None:
    with op.batch_alter_table("report_hours") as batch_op:
        for counter in reversed(COUNTERS):
            batch_op.drop_column(counter)
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "report_values",
            "metric",
            existing_type=sa.String(length=16),
            existing_nullable=False,
            comment="length, country, region, response, first_response",
            existing_comment="length, country, region, response, first_response, status",
        )
    with op.batch_alter_table("conversations") as batch_op:
        for name in (
            "answers_rated_down",
            "answers_rated_up",
            "answers_feedback_known",
            "chatbase_user_id",
            "title",
            "status",
        ):
            batch_op.drop_column(name)
