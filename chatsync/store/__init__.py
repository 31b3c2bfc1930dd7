"""Storage: tables, engine and migrations, upserts and queries. No HTTP here."""
