"""chatsync's tables (SQLAlchemy Core). Alembic migrations in ``chatsync/migrations`` create them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

# none_as_null: a Python None is SQL NULL (not JSON null), so "IS NULL" means "absent" in every query.
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Moment = DateTime(timezone=True)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True, comment="Clerk user id"),
    Column("email", String(320)),
    Column("first_name", String(200)),
    Column("last_name", String(200)),
    Column("image_url", Text),
    Column("clerk_created_at", Moment),
    Column("clerk_updated_at", Moment),
    Column("deleted_at", Moment),
)

chatbots = Table(
    "chatbots",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("name", String(200)),
    Column("first_day", Date, comment="first UTC day with a conversation, found on the first full sync"),
    Column("last_synced_at", Moment),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("chatbot_id", String(128), nullable=False),
    Column("user_id", String(64), comment="owning Clerk user, when one is assigned"),
    Column("created_at", Moment, nullable=False),
    Column("last_message_at", Moment),
    Column("source", String(64)),
    Column("customer", Text),
    Column("country", String(16)),
    Column("min_score", Float),
    # what only the API v2 export sends; NULL for a record that does not carry it (API v1)
    Column("status", String(32), comment="Chatbase's status: ongoing, ended, taken_over or paused"),
    Column("title", String(1000), comment="Chatbase's title of the conversation"),
    Column(
        "chatbase_user_id", String(256), comment="Chatbase's userId (the chatbot site's user; not Clerk's)"
    ),
    Column("messages", Json, nullable=False, comment="the messages exactly as Chatbase sent them"),
    Column("raw", Json, nullable=False, comment="every other field Chatbase sent"),
    Column("content_hash", String(32), nullable=False),
    # figures the report aggregates, computed at sync time
    Column("message_count", Integer, nullable=False),
    Column("user_messages", Integer, nullable=False),
    Column("assistant_messages", Integer, nullable=False),
    Column("response_steps", Integer, nullable=False),
    Column("response_seconds", Json, comment="seconds of each timed user→assistant step"),
    Column("first_response_seconds", Float),
    Column("unanswered", Boolean, nullable=False),
    Column("answers_feedback_known", Integer, comment="answers carrying feedback, rated or not; NULL: none"),
    Column("answers_rated_up", Integer, comment="answers with feedback positive; NULL when none is known"),
    Column("answers_rated_down", Integer, comment="answers with feedback negative; NULL when none is known"),
    # the WhatsApp rule's finding, and the number in force (a person's manual value beats both)
    Column("wa_outcome", String(16), nullable=False),
    Column("wa_extracted", String(20)),
    Column("wa_form", String(20)),
    Column("wa_channel", String(20), comment="the WhatsApp sender's own number, on WhatsApp conversations"),
    Column("wa_lead", String(20), comment="the phone of the conversation's latest lead form"),
    Column("wa_matched", Text),
    Column("wa_reasons", Json),
    Column("whatsapp_number", String(20)),
    Column("whatsapp_source", String(16)),
    Column("whatsapp_region", String(4)),
    Column("first_synced_at", Moment, nullable=False),
    Column("synced_at", Moment, nullable=False),
    Index("ix_conversations_chatbot_created", "chatbot_id", "created_at", "id"),
    Index("ix_conversations_created", "created_at", "id"),
    Index("ix_conversations_source_created", "source", "created_at"),
    Index("ix_conversations_whatsapp_number", "whatsapp_number"),
    Index("ix_conversations_user_id", "user_id"),
)

# Rollups of the report's figures, kept in step with `conversations` in the same transaction by
# chatsync.store.rollups, so an all-time report reads thousands of rows instead of every conversation.
# `source` is the Chatbase source, '' when it sent none (a key column cannot be NULL).
ROLLUP_COUNTERS = (
    "conversations",
    "messages",
    "user_messages",
    "assistant_messages",
    "keyed",
    "engaged",
    "with_steps",
    "with_pairs",
    "with_first",
    "unanswered",
    "prompted",
    "replied",
    "captured",
    "manual",
    "from_form",
    "with_number",
    "from_channel",
    "from_lead",
    "missed_no_reply",
    "missed_not_found",
    "missed_ambiguous",
    "with_status",
    "taken_over",
    "with_feedback",
    "answers_feedback_known",
    "answers_rated_up",
    "answers_rated_down",
)

# Counters added by migrations 0006 and 0007: they were added with DEFAULT 0 to fill the rows already
# there, so a database created at the head revision declares the same default (create_schema).
_ADDED_COUNTERS = frozenset(ROLLUP_COUNTERS[ROLLUP_COUNTERS.index("with_status") :]) | {
    "from_channel",
    "from_lead",
}

report_hours = Table(
    "report_hours",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("hour", Moment, primary_key=True, comment="UTC hour the conversations were created in"),
    *[
        Column(name, Integer, nullable=False, server_default="0" if name in _ADDED_COUNTERS else None)
        for name in ROLLUP_COUNTERS
    ],
    sqlite_with_rowid=False,  # one b-tree by the key, not a table and its key (migration 0008)
)

report_values = Table(
    "report_values",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column(
        "metric",
        String(16),
        primary_key=True,
        comment="length, country, region, response, first_response, status",
    ),
    Column("value", String(64), primary_key=True),
    Column("n", Integer, nullable=False),
    sqlite_with_rowid=False,  # one b-tree by the key, not a table and its key (migration 0008)
)

report_users = Table(
    "report_users",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("user_key", String(32), primary_key=True, comment="hash of the WhatsApp number or customer"),
    Column("n", Integer, nullable=False, comment="conversations with this key"),
    sqlite_with_rowid=False,  # one b-tree by the key, not a table and its key (migration 0008)
)

whatsapp_audit = Table(
    "whatsapp_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "conversation_id", String(128), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    ),
    Column("at", Moment, nullable=False),
    Column("by", String(200), nullable=False),
    Column("old", String(20)),
    Column("new", String(20)),
    Column("old_source", String(16)),
    Column("new_source", String(16)),
    Index("ix_whatsapp_audit_conversation", "conversation_id", "id"),
)

sync_days = Table(
    "sync_days",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column("scope", String(400), primary_key=True, comment="'*' or the sorted sources the run filtered on"),
    Column("day", Date, primary_key=True),
    Column("fetched_at", Moment, nullable=False, comment="when the fetch of this day began"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("chatbot_ids", Json, nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", Moment, nullable=False),
    Column("finished_at", Moment),
    Column("summary", Json),
    Column("error", Text),
)

# The PostgreSQL sync lock (chatsync.store.locks): one lease row per chatbot being synced. It needs no server
# session, so it holds behind a transaction pooler; SQLite uses a file lock instead and leaves this empty.
sync_leases = Table(
    "sync_leases",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column(
        "holder", String(36), nullable=False, comment="random id of this hold; only it renews or releases"
    ),
    Column(
        "host", String(255), nullable=False, comment="hostname of the holder, for people reading the table"
    ),
    Column("pid", Integer, nullable=False),
    Column(
        "pid_namespace",
        String(100),
        comment="boot id and PID namespace of the holder: where its pid means the same process; NULL if unknown",
    ),
    Column(
        "process_start", BigInteger, comment="holder's start in clock ticks after boot: tells a reused pid"
    ),
    Column("acquired_at", Moment, nullable=False, comment="database clock"),
    Column("expires_at", Moment, nullable=False, comment="database clock; renewed while the sync runs"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chatbot_id", String(128), nullable=False),
    Column("record_key", String(160), nullable=False, comment="conversation id, or a hash of the record"),
    Column("conversation_id", String(128)),
    Column("reason", Text, nullable=False),
    Column("raw", Text, nullable=False, comment="the record as received, JSON-escaped"),
    Column("first_seen_at", Moment, nullable=False),
    Column("last_seen_at", Moment, nullable=False),
    Column("run_id", String(36)),
    UniqueConstraint("chatbot_id", "record_key"),
)

access_grants = Table(
    "access_grants",
    metadata,
    Column("chatbot_id", String(128), primary_key=True),
    Column("principal_type", String(8), primary_key=True, comment="'user' or 'org'"),
    Column("principal_id", String(64), primary_key=True, comment="Clerk user id or organization id"),
    Column("granted_at", Moment, nullable=False),
    Index("ix_access_grants_principal", "principal_type", "principal_id"),
)

# Chatbase lead forms (name, email, phone), from the `leads.submit` webhook and the `get-leads` backfill
# (chatsync.store.leads). A webhook lead names its conversation, whose number its phone may become; a
# backfilled one does not. One lead received both ways is one row, holding both keys.
leads = Table(
    "leads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chatbot_id", String(128), nullable=False),
    Column("chatbase_id", String(128), comment="the get-leads row's id (backfill)"),
    Column("delivery", String(64), comment="hash of the webhook's event: a redelivery carries the same"),
    Column("conversation_id", String(128), comment="from the webhook; get-leads rows carry none"),
    Column("name", Text),
    Column("email", Text),
    Column("phone", Text, comment="as the user typed it"),
    Column("number", String(20), comment="E.164 of phone by the WhatsApp rule, else NULL"),
    Column(
        "submitted_at", Moment, nullable=False, comment="Chatbase's created_at, else when the webhook came"
    ),
    Column("received_at", Moment, nullable=False),
    Column("raw", Json, nullable=False, comment="the webhook payload or get-leads row as received"),
    UniqueConstraint("chatbot_id", "chatbase_id"),
    UniqueConstraint("delivery"),
    Index("ix_leads_chatbot_submitted", "chatbot_id", "submitted_at"),
    Index("ix_leads_conversation_id", "conversation_id"),
)

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(128), primary_key=True, comment="svix-id: a redelivery carries the same id"),
    Column("type", String(64), nullable=False),
    Column("received_at", Moment, nullable=False),
)

# The change log: one row per conversation written and per sync finished, appended by the writers in the
# transaction that makes the change (chatsync.store.changes), so `seq` orders changes as they committed.
# The HTTP API's event streams are cursors over it: `seq` is the SSE event id a client resumes from.
changes = Table(
    "changes",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False, comment="'conversation.upserted' or 'sync.finished'"),
    Column("subject", String(128), nullable=False, comment="the conversation id or the sync run id"),
    Column("chatbot_id", String(128), comment="the conversation's chatbot; NULL for a sync run"),
    Column("at", Moment, nullable=False),
    sqlite_autoincrement=True,
)
