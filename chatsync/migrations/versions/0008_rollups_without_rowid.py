"""SQLite keeps the report's rollups as WITHOUT ROWID tables: one b-tree by their primary key, not a
table plus an index of the same key

Every page a sync stores adds ~400 rollup rows (most of them new keys: response times to the
millisecond, user keys), and each went into two b-trees. Clustered by the key, a 20,000-conversation
sync spent 0.7–1.0 s less (of 15 s, measured interleaved on a 2-core machine). PostgreSQL has no such
choice: nothing changes there.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("report_hours", "report_values", "report_users")


def upgrade() -> None:
    _rebuild(with_rowid=False)


def downgrade() -> None:
    _rebuild(with_rowid=True)


def _rebuild(with_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        # (Alembic's batch mode: a new table as declared, the rows copied, the old one dropped)
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_with_rowid": with_rowid}):
            pass
