"""Alembic environment for chatsync's schema.

``chatsync db upgrade`` (and every command's automatic upgrade) hands its own connection in
``config.attributes['connection']``. Run as ``alembic …`` from a checkout (``alembic.ini`` at the top
level), the database is chatsync's setting: ``CHATSYNC_DATABASE_URL``, else ``DATABASE_URL``, else
``.env``, else the default SQLite file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from chatsync.store.tables import metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    if (
        context.config.config_file_name is not None
        and context.config.get_main_option("logging", "on") == "on"
    ):
        from logging.config import fileConfig

        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    from chatsync.config import load_settings
    from chatsync.store.engine import open_engine

    engine = open_engine(load_settings().database_url)
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()
