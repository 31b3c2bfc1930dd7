"""Settings precedence (flag > environment > .env > default) and the URLs chatsync accepts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.pool import NullPool

from chatsync.config import Secret, load_settings, mask_url, normalize_database_url
from chatsync.errors import UsageError
from chatsync.store.engine import open_engine


def test_flag_beats_environment_beats_dotenv_beats_default(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "CHATBASE_CHATBOT_ID=from-dotenv\nCHATSYNC_TIMEZONE=Asia/Singapore\nCHATBASE_API_KEY=k1\n"
    )
    env = {"CHATBASE_CHATBOT_ID": "from-env", "CHATSYNC_LOOKBACK": "12h"}
    settings = load_settings({"chatbot_ids": ["from-flag"]}, env=env, dotenv_path=dotenv)
    assert settings.chatbot_ids == ("from-flag",)
    settings = load_settings({}, env=env, dotenv_path=dotenv)
    assert settings.chatbot_ids == ("from-env",)
    assert settings.timezone == "Asia/Singapore"  # only the .env sets it
    assert settings.lookback == timedelta(hours=12)
    assert settings.api_key is not None and settings.api_key.reveal() == "k1"
    default = load_settings({}, env={}, dotenv_path=tmp_path / "missing")
    assert default.timezone == "UTC" and default.lookback == timedelta(days=3)
    assert default.base_url == "https://www.chatbase.co/api/v1"
    assert default.whatsapp.default_region == "HK"
    assert default.database_url.startswith("sqlite:///") and default.database_url.endswith("chatsync.db")


def test_chatbot_ids_split_on_commas_and_database_url_falls_back_to_database_url(tmp_path: Path) -> None:
    env = {"CHATBASE_CHATBOT_ID": "a, b,a", "DATABASE_URL": "postgres://u:p@db.example.com:5432/app"}
    settings = load_settings({}, env=env, dotenv_path=tmp_path / "none")
    assert settings.chatbot_ids == ("a", "b")
    assert settings.database_url == "postgresql+psycopg://u:p@db.example.com:5432/app"
    env["CHATSYNC_DATABASE_URL"] = "sqlite:///x.db"
    assert load_settings({}, env=env, dotenv_path=tmp_path / "none").database_url == "sqlite:///x.db"


def test_region_setting_reaches_the_rule(tmp_path: Path) -> None:
    settings = load_settings({}, env={"CHATSYNC_DEFAULT_REGION": "sg"}, dotenv_path=tmp_path / "none")
    assert settings.whatsapp.default_region == "SG"
    with pytest.raises(UsageError, match="unknown region"):
        load_settings({"region": "XX"}, env={}, dotenv_path=tmp_path / "none")


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("CHATSYNC_TIMEZONE", "Mars/Olympus", "unknown time zone"),
        ("CHATSYNC_RETRY_BUDGET", "soon", "invalid duration"),
        ("CHATSYNC_WHATSAPP_VALIDATION", "lenient", "strict or off"),
        ("CHATSYNC_RATE_LIMIT", "lots", "invalid rate limit"),
    ],
)
def test_bad_settings_say_what_was_expected(tmp_path: Path, variable: str, value: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        load_settings({}, env={variable: value}, dotenv_path=tmp_path / "none")


def test_the_key_never_shows_itself() -> None:
    secret = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(secret) and "sk-very-secret" not in str(secret)
    assert "sk-very-secret" not in repr(load_settings({"api_key": "sk-very-secret"}, env={}))


@pytest.mark.parametrize("sent", ["sk-secret42\n", "sk-secret42\r\n", "  sk-secret42\r", "\tsk-secret42 "])
def test_a_key_from_a_secrets_file_loses_its_line_ending(tmp_path: Path, sent: str) -> None:
    settings = load_settings({}, env={"CHATBASE_API_KEY": sent}, dotenv_path=tmp_path / "none")
    assert settings.api_key is not None and settings.api_key.reveal() == "sk-secret42"


@pytest.mark.parametrize(
    ("sent", "kind"),
    [("sk-sec\rret42", "a control character"), ("sk-sec ret42", "a space"), ("sk-sécret42", "a non-ASCII")],
)
def test_a_key_no_header_can_carry_is_refused_without_showing_it(
    tmp_path: Path, sent: str, kind: str
) -> None:
    with pytest.raises(UsageError) as raised:
        load_settings({}, env={"CHATBASE_API_KEY": sent}, dotenv_path=tmp_path / "none")
    message = str(raised.value)
    assert message.startswith("CHATBASE_API_KEY: ") and kind in message
    assert "sec" not in message.replace("secrets", "") and "42" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHATBASE_BASE_URL", "ftp://x"),
        ("CHATBASE_BASE_URL", "notaurl"),
        ("CHATBASE_BASE_URL", "http://"),
        ("CHATBASE_API_URL", "https://[::1"),
        ("CHATBASE_API_URL", "file:///etc/passwd"),
        ("CHATBASE_BASE_URL", "http://127.0.0.1:8742:80/api/v1"),
        ("CHATBASE_BASE_URL", "http://127.0.0.1:99999/api/v1"),
        ("CHATBASE_BASE_URL", "http://127.0.0.1:abc/api/v1"),
        ("CHATBASE_API_URL", "http://my host/api/v2"),
    ],
)
def test_an_api_root_that_is_not_an_http_url_is_refused(tmp_path: Path, variable: str, value: str) -> None:
    with pytest.raises(UsageError, match=f"^{variable}: invalid Chatbase API .*expected an http"):
        load_settings({}, env={variable: value}, dotenv_path=tmp_path / "none")
    masked = load_settings(
        {}, env={variable: "https://u:pw@x.example/api/v1/"}, dotenv_path=tmp_path / "none"
    )
    assert (
        masked.base_url if variable == "CHATBASE_BASE_URL" else masked.api_url
    ) == "https://u:pw@x.example/api/v1"
    with pytest.raises(UsageError) as raised:
        load_settings({}, env={variable: "ftp://u:pw@x.example"}, dotenv_path=tmp_path / "none")
    assert "pw" not in str(raised.value)


@pytest.mark.parametrize(("setting", "flag"), [("timezone", "--tz"), ("chatbot_ids", "--chatbot-id")])
@pytest.mark.parametrize("given", ["", "  ", [""], ["", " "]])
def test_an_option_given_empty_is_refused_not_taken_for_unset(
    tmp_path: Path, setting: str, flag: str, given: object
) -> None:
    env = {"CHATSYNC_TIMEZONE": "Asia/Tokyo", "CHATBASE_CHATBOT_ID": "bot-a"}
    with pytest.raises(UsageError, match=f"^{flag} is empty: give a value, or leave the option out$"):
        load_settings({setting: given}, env=env, dotenv_path=tmp_path / "none")
    assert load_settings({setting: None}, env=env, dotenv_path=tmp_path / "none").timezone == "Asia/Tokyo"


def test_a_time_zone_in_any_case_is_the_databases_spelling(tmp_path: Path) -> None:
    for typed, zone in (
        ("utc", "UTC"),
        ("asia/hong_kong", "Asia/Hong_Kong"),
        ("Europe/London", "Europe/London"),
    ):
        assert load_settings({"timezone": typed}, env={}, dotenv_path=tmp_path / "none").timezone == zone


def test_supabase_urls_work_as_given() -> None:
    assert normalize_database_url("postgres://a:b@h:5432/d") == "postgresql+psycopg://a:b@h:5432/d"
    assert (
        normalize_database_url("postgresql://a:b@h/d?sslmode=require")
        == "postgresql+psycopg://a:b@h/d?sslmode=require"
    )
    assert mask_url("postgresql+psycopg://a:hunter2@h/d") == "postgresql+psycopg://a:***@h/d"
    session = open_engine("postgresql://u:p@pooler.example.com:5432/postgres?sslmode=require")
    pooled = open_engine("postgresql://u:p@pooler.example.com:6543/postgres?sslmode=require")
    flagged = open_engine("postgres://u:p@pooler.example.com:5432/postgres?pgbouncer=true")
    assert session.dialect.driver == "psycopg" and not isinstance(session.pool, NullPool)
    assert isinstance(pooled.pool, NullPool)
    assert isinstance(flagged.pool, NullPool) and "pgbouncer" not in str(flagged.url)
    assert pooled.url.query["sslmode"] == "require"


def test_each_value_records_where_it_came_from(tmp_path: Path) -> None:
    from chatsync.config import Origin, describe_settings

    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "CLERK_ISSUER=https://clerk.example.com\nCLERK_WEBHOOK_SIGNING_SECRET=whsec_abc\nDATABASE_URL=sqlite:///d.db\n"
    )
    env = {"CHATSYNC_TIMEZONE": "Asia/Hong_Kong", "CLERK_AUTHORIZED_PARTIES": "https://app.example.com/"}
    settings = load_settings({"log_format": "json"}, env=env, dotenv_path=dotenv)
    assert settings.origin_of("log_format") == Origin("flag", "--log-format")
    assert settings.origin_of("timezone") == Origin("env", "CHATSYNC_TIMEZONE")
    assert settings.origin_of("clerk_issuer") == Origin(".env", "CLERK_ISSUER")
    assert settings.origin_of("database_url") == Origin(".env", "DATABASE_URL")
    assert settings.origin_of("concurrency") == Origin("default")
    rows = {row.name: row for row in describe_settings(settings)}
    assert rows["clerk_webhook_secret"].value == "***" and "whsec_abc" not in repr(settings)
    assert str(rows["timezone"].origin) == "env CHATSYNC_TIMEZONE"
    # CORS lets in exactly the frontend's origins unless told otherwise
    assert settings.allowed_origins == ("https://app.example.com",)
    overridden = load_settings(
        {}, env={**env, "CHATSYNC_CORS_ORIGINS": "http://localhost:3000"}, dotenv_path=dotenv
    )
    assert overridden.allowed_origins == ("http://localhost:3000",)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("CHATSYNC_CORS_ORIGINS", "*", "exact origin"),
        ("CHATSYNC_CORS_ORIGINS", "https://app.example.com/path", "exact origin"),
        ("CHATSYNC_LOG_FORMAT", "xml", "text or json"),
        ("CHATSYNC_EVENTS_PER_USER", "many", "whole number"),
        ("CHATSYNC_JWKS_CACHE", "soon", "invalid duration"),
    ],
)
def test_bad_api_settings_say_what_was_expected(
    tmp_path: Path, variable: str, value: str, fragment: str
) -> None:
    with pytest.raises(UsageError, match=fragment):
        load_settings({}, env={variable: value}, dotenv_path=tmp_path / "none")


def test_a_transaction_pooler_is_recognised_by_its_port_or_the_flag() -> None:
    """PgBouncer's own default port once broke sync with "prepared statement does not exist"."""
    from sqlalchemy.pool import NullPool

    from chatsync.store.engine import open_engine

    for url in (
        "postgresql://u@db.example.com:6543/postgres",
        "postgresql://u@db.example.com:6432/postgres",
        "postgresql://u@db.example.com:7000/postgres?pgbouncer=true",
    ):
        engine = open_engine(url)
        assert isinstance(engine.pool, NullPool), url
        assert "pgbouncer" not in str(engine.url)
    assert not isinstance(open_engine("postgresql://u@db.example.com:5432/postgres").pool, NullPool)
