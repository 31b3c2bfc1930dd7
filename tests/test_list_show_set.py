"""list, show and set-whatsapp on SQLite and PostgreSQL: filters, formats, paging, corrections, plans."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text

from chatsync.config import WhatsAppRule
from chatsync.errors import ExitCode
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.store.queries import LIST_KEYS, ConversationFilter, iter_conversations, list_statement
from chatsync.store.tables import conversations

PROMPT = "May I have your WhatsApp number?"


def _conversation(
    cid: str,
    created: str,
    bot: str = "bot-a",
    source: str | None = "WhatsApp",
    reply: str = "no",
    words: str = "hello",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": cid,
        "chatbot_id": bot,
        "created_at": created,
        "source": source,
        "messages": [
            {"role": "assistant", "content": PROMPT},
            {"role": "user", "content": reply},
            {"role": "assistant", "content": f"we talked about {words}"},
        ],
        **extra,
    }


SET = [
    _conversation("c1", "2024-05-01T08:00:00Z", reply="9123 4567", words="Parking"),
    _conversation("c2", "2024-05-02T08:00:00Z", bot="bot-b", source="Widget or Iframe", customer="cust_9"),
    _conversation("c3", "2024-05-03T08:00:00Z", reply="+65 9123 4567", words="停車場"),
    _conversation("c4", "2024-05-03T08:00:00Z", source=None, reply="9123-4567"),  # same instant as c3
    _conversation("c5", "2024-05-04T23:59:59Z", bot="bot-b", reply="6123 4567", customer={"name": "Mei"}),
    _conversation("c6", "2024-05-05T00:00:00Z", source="API", words="100% off_sale"),
]


@pytest.fixture
def seeded(engine: Any) -> str:
    rows = [normalize_conversation(raw, raw["chatbot_id"], WhatsAppRule()) for raw in SET]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))
    return engine.url.render_as_string(hide_password=False)


def _ids(cli: Any, url: str, *args: str) -> list[str]:
    result = cli("--database-url", url, "list", "--format", "json", "--all", *args)
    assert result.exit_code == 0, result.stderr
    return [row["id"] for row in json.loads(result.stdout)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["c6", "c5", "c4", "c3", "c2", "c1"]),
        (("--chatbot-id", "bot-b"), ["c5", "c2"]),
        (("--chatbot-id", "bot-a", "--chatbot-id", "bot-b"), ["c6", "c5", "c4", "c3", "c2", "c1"]),
        (("--source", "whatsapp"), ["c5", "c3", "c1"]),
        (("--source", "Unspecified"), ["c4"]),
        (("--source", "API", "--source", "widget or iframe"), ["c6", "c2"]),
        (("--since", "2024-05-03"), ["c6", "c5", "c4", "c3"]),
        (("--until", "2024-05-04"), ["c5", "c4", "c3", "c2", "c1"]),
        (("--since", "2024-05-04", "--until", "2024-05-04"), ["c5"]),
        (("--has-whatsapp",), ["c5", "c4", "c3", "c1"]),
        (("--no-whatsapp",), ["c6", "c2"]),
        (("--number", "91234567"), ["c4", "c1"]),
        (("--number", "+852 9123 4567"), ["c4", "c1"]),
        (("--number", "+65 9123 4567"), ["c3"]),
        (("--search", "parking"), ["c1"]),
        (("--search", "停車"), ["c3"]),
        (("--search", "100%"), ["c6"]),
        (("--search", "f_s"), ["c6"]),
        (("--search", "%"), ["c6"]),  # a wildcard character is searched for literally
        (
            ("--chatbot-id", "bot-a", "--has-whatsapp", "--source", "WhatsApp", "--since", "2024-05-02"),
            ["c3"],
        ),
        (("--number", "91234567", "--until", "2024-05-02"), ["c1"]),
        (("--no-whatsapp", "--search", "hello"), ["c2"]),
    ],
)
def test_every_filter_alone_and_combined(
    cli: Any, seeded: str, args: tuple[str, ...], expected: list[str]
) -> None:
    assert _ids(cli, seeded, *args) == expected


def test_a_list_cut_by_its_limit_says_so_on_stderr_only(cli: Any, seeded: str) -> None:
    cut = cli("--database-url", seeded, "list", "--limit", "2", "--format", "csv")
    assert len(list(csv.reader(io.StringIO(cut.stdout)))) == 3  # the header and two rows, nothing else
    assert "--all for every match" in cut.stderr
    whole = cli("--database-url", seeded, "list", "--limit", "6", "--format", "csv")
    every = cli("--database-url", seeded, "list", "--all", "--format", "csv")
    assert whole.stdout == every.stdout and every.stderr == ""
    assert "--all" in whole.stderr  # six of six: it cannot know without counting, so it says so
    assert cli("--database-url", seeded, "list", "--limit", "7", "--format", "csv").stderr == ""


def test_limit_and_all_together_are_refused(cli: Any, seeded: str) -> None:
    """`--limit 5 --all` printed every row: the limit was silently dropped."""
    result = cli("--database-url", seeded, "list", "--limit", "5", "--all", "--format", "json")
    assert result.exit_code == ExitCode.USAGE and result.stdout == ""
    assert result.stderr == "error: give --limit or --all, not both\n"


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("show", "c-1"),
        ("report",),
        ("status",),
        ("set-whatsapp", "c-1", "91234567"),
        ("quarantine", "list"),
        ("db", "info"),
        ("access", "list"),
    ],
)
def test_a_command_on_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(
    cli: Any, tmp_path: Any, args: tuple[str, ...]
) -> None:
    """A mistyped path once made its folders and an empty database, and the command said all was well
    (found by a breaking helper). Only the commands that fill a database (sync, db upgrade, …) make one."""
    missing = tmp_path / "typo" / "chatsync.db"
    result = cli("--database-url", f"sqlite:///{missing}", *args)
    assert result.exit_code == ExitCode.ERROR and result.stdout == ""
    assert result.stderr == (
        f"error: cannot open the database: no database file at {missing}: check the URL, or run chatsync "
        "sync to make one\n"
    )
    assert not (tmp_path / "typo").exists()


def test_an_empty_database_says_so_where_no_match_would_not(cli: Any, seeded: str, tmp_path: Any) -> None:
    """After the demo a newcomer ran plain `list` on the default (empty) database and got only "no
    conversations match": now stderr names the database and how to fill it; stdout stays the rows alone."""
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli("--database-url", empty, "db", "upgrade").exit_code == 0
    for args in (("list", "--format", "json"), ("report", "--format", "json")):
        result = cli("--database-url", empty, *args)
        assert result.exit_code == 0
        assert result.stderr.startswith(f"no conversation is stored in {empty} yet: run chatsync sync"), (
            result.stderr
        )
        assert len(result.stderr.splitlines()) == 1
    nothing = cli("--database-url", seeded, "list", "--search", "no such words anywhere", "--format", "json")
    assert (nothing.stdout, nothing.stderr) == (
        "[]\n",
        "",
    )  # a database with data: nothing matched, that is all
    window = cli(
        "--database-url",
        seeded,
        "report",
        "--since",
        "2001-01-01",
        "--until",
        "2001-01-02",
        "--format",
        "json",
    )
    assert window.exit_code == 0 and window.stderr == ""


def test_limit_and_newest_first_with_ties_broken_by_id(cli: Any, seeded: str) -> None:
    result = cli("--database-url", seeded, "list", "--format", "json", "--limit", "3")
    assert [r["id"] for r in json.loads(result.stdout)] == ["c6", "c5", "c4"]
    assert result.stderr == "the newest 3 matches (--limit 3); --all for every match\n"
    one = cli("--database-url", seeded, "list", "--format", "json", "--limit", "1")
    assert one.stderr == "the newest match (--limit 1); --all for every match\n"


def test_keyset_pages_cover_everything_once(engine: Any, seeded: str) -> None:
    rows = list(iter_conversations(engine, ConversationFilter(), limit=None, page_size=2))
    assert [r["id"] for r in rows] == ["c6", "c5", "c4", "c3", "c2", "c1"]


def test_every_format_has_exactly_the_contract_keys(cli: Any, seeded: str) -> None:
    def run(fmt: str) -> str:
        result = cli("--database-url", seeded, "list", "--format", fmt, "--all")
        assert result.exit_code == 0 and result.stderr == ""
        return result.stdout

    as_json = json.loads(run("json"))
    as_ndjson = [json.loads(line) for line in run("ndjson").splitlines()]
    as_csv = list(csv.DictReader(io.StringIO(run("csv"))))
    assert [list(r) for r in as_json] == [LIST_KEYS] * 6
    assert as_ndjson == as_json
    assert list(as_csv[0]) == LIST_KEYS
    for row_csv, row_json in zip(as_csv, as_json, strict=True):
        assert row_csv == {k: "" if v is None else str(v) for k, v in row_json.items()}
    first = as_json[-1]
    assert first == {
        "id": "c1",
        "chatbot_id": "bot-a",
        "created_at": "2024-05-01T08:00:00Z",
        "last_message_at": None,
        "source": "WhatsApp",
        "customer": None,
        "country": None,
        "message_count": 3,
        "whatsapp_number": "+85291234567",
        "whatsapp_source": "extracted",
    }
    customers = {r["id"]: r["customer"] for r in as_json}
    assert (customers["c2"], customers["c5"]) == ("cust_9", "Mei")
    assert json.loads(run("json").replace("\n", "")) == as_json


def test_table_output_names_the_conversation_ids(cli: Any, seeded: str) -> None:
    result = cli("--database-url", seeded, "list", "--format", "table", "--limit", "2")
    assert result.exit_code == 0
    assert "c6" in result.stdout and "c5" in result.stdout and "c4" not in result.stdout


def test_bad_filters_exit_2(cli: Any, seeded: str) -> None:
    for args, fragment in [
        (("--number", "1234"), "expected 8 digits"),
        (("--since", "May 1"), "expected YYYY-MM-DD"),
        (("--since", "2026-11-31"), "'2026-11-31': no such day"),
        (("--format", "xml"), "invalid --format"),
        (("--source", "Telegram"), "unknown source"),
    ]:
        result = cli("--database-url", seeded, "list", *args)
        assert result.exit_code == ExitCode.USAGE and fragment in result.stderr, (args, result.output)


# ------------------------------------------------------------------------------------------ set-whatsapp
@pytest.mark.parametrize("written", ["9123 4567", "+852 9123 4567", "85291234567"])
def test_set_whatsapp_normalises_every_accepted_form(cli: Any, seeded: str, written: str) -> None:
    result = cli("--database-url", seeded, "set-whatsapp", "c2", written, "--by", "alice")
    assert result.exit_code == 0, result.stderr
    assert "+85291234567 (manual)" in result.stdout
    shown = json.loads(cli("--database-url", seeded, "show", "c2", "--format", "json").stdout)
    assert (shown["whatsapp_number"], shown["whatsapp_source"]) == ("+85291234567", "manual")


@pytest.mark.parametrize("written", ["+65\ufe0d 9123 4567", "\u200e+65\u200b 9123\u20604567\u200f"])
def test_set_whatsapp_ignores_invisible_characters(cli: Any, seeded: str, written: str) -> None:
    result = cli("--database-url", seeded, "set-whatsapp", "c2", written, "--by", "alice")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(cli("--database-url", seeded, "show", "c2", "--format", "json").stdout)
    assert (shown["whatsapp_number"], shown["whatsapp_source"]) == ("+6591234567", "manual")


@pytest.mark.parametrize("written", ["1234", "2024-01-05", "abc", "+65 / 9123 4567"])
def test_set_whatsapp_refuses_what_is_not_a_number_and_changes_nothing(
    cli: Any, engine: Any, seeded: str, written: str
) -> None:
    with engine.connect() as connection:
        before = connection.execute(select(conversations)).mappings().all()
    result = cli("--database-url", seeded, "set-whatsapp", "c1", written)
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.startswith("error: invalid WhatsApp number") and "expected 8 digits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with engine.connect() as connection:
        assert connection.execute(select(conversations)).mappings().all() == before


def test_set_whatsapp_on_an_unknown_id_exits_1(cli: Any, seeded: str) -> None:
    result = cli("--database-url", seeded, "set-whatsapp", "nope", "91234567")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == (
        "error: conversation 'nope' not found: give the whole id, as `chatsync list` prints it"
    )
    shown = cli("--database-url", seeded, "show", "nope")
    assert shown.exit_code == ExitCode.ERROR and "conversation 'nope' not found" in shown.stderr


def test_set_whatsapp_needs_exactly_one_action(cli: Any, seeded: str) -> None:
    for args in ((), ("91234567", "--clear"), ("--clear", "--auto")):
        assert cli("--database-url", seeded, "set-whatsapp", "c1", *args).exit_code == ExitCode.USAGE


def test_every_change_is_shown_with_who_and_when(cli: Any, seeded: str) -> None:
    url = ("--database-url", seeded)
    assert cli(*url, "set-whatsapp", "c1", "6123 4567", "--by", "alice").exit_code == 0
    assert cli(*url, "set-whatsapp", "c1", "--clear", "--by", "bob").exit_code == 0
    assert cli(*url, "set-whatsapp", "c1", "--auto", "--by", "carol").exit_code == 0
    unchanged = cli(*url, "set-whatsapp", "c1", "--auto", "--by", "dave")
    assert unchanged.exit_code == 0 and "unchanged" in unchanged.stderr
    shown = json.loads(cli(*url, "show", "c1", "--format", "json").stdout)
    audit = [(a["by"], a["old"], a["new"], a["old_source"], a["new_source"]) for a in shown["whatsapp_audit"]]
    assert audit == [
        ("alice", "+85291234567", "+85261234567", "extracted", "manual"),
        ("bob", "+85261234567", None, "manual", "manual"),
        ("carol", None, "+85291234567", "manual", "extracted"),
    ]
    assert all(a["at"].endswith("Z") for a in shown["whatsapp_audit"])
    assert [m["role"] for m in shown["messages"]] == ["assistant", "user", "assistant"]
    assert set(shown) == {*LIST_KEYS, "title", "status", "messages", "whatsapp_audit"}
    assert (shown["title"], shown["status"]) == (None, None)  # API v1 data carries neither
    table = cli(*url, "show", "c1", "--format", "table")
    assert "alice" in table.stdout and "captured" in table.stdout


# ------------------------------------------------------------------------------------------- query plans
@pytest.mark.postgres
def test_lookups_use_indexes_on_postgres(postgres_url: str) -> None:
    from chatsync.store.engine import ensure_schema, open_engine

    engine = open_engine(postgres_url)
    ensure_schema(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO conversations (id, chatbot_id, created_at, source, messages, raw, content_hash, "
                "message_count, user_messages, assistant_messages, response_steps, unanswered, wa_outcome, "
                "whatsapp_number, whatsapp_source, first_synced_at, synced_at) "
                "SELECT 'c' || g, 'bot-' || (g % 3), now() - g * interval '1 minute', "
                "CASE WHEN g % 2 = 0 THEN 'WhatsApp' ELSE 'API' END, '[]'::jsonb, '{}'::jsonb, 'h', 0, 0, 0, 0, "
                "false, 'no_prompt', CASE WHEN g % 4 = 0 THEN '+8529' || lpad((g % 10000000)::text, 7, '0') END, "
                "CASE WHEN g % 4 = 0 THEN 'extracted' END, now(), now() FROM generate_series(1, 60000) AS g"
            )
        )
        connection.execute(text("ANALYZE conversations"))
    dialect = engine.dialect

    def plan(statement: Any) -> str:
        sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        with engine.connect() as connection:
            return "\n".join(row[0] for row in connection.execute(text("EXPLAIN " + sql)))

    by_number = plan(list_statement(ConversationFilter(number="+85290000004"), "postgresql", 20))
    with_number = plan(
        list_statement(ConversationFilter(has_whatsapp=True, sources=("WhatsApp",)), "postgresql", 20)
    )
    show = plan(select(conversations).where(conversations.c.id == "c42"))
    engine.dispose()
    assert "ix_conversations_whatsapp_number" in by_number, by_number
    assert "Index" in with_number and "Seq Scan" not in with_number, with_number
    assert "pk_conversations" in show, show


def test_search_ignores_case_in_every_script(cli: Any, database_url: str) -> None:
    """SQLite's LIKE folded ASCII only: 'école' did not find 'École' there (PostgreSQL's ILIKE did)."""
    from datetime import UTC, datetime

    from chatsync.config import WhatsAppRule
    from chatsync.normalize import normalize_conversation
    from chatsync.store import writes
    from chatsync.store.engine import ensure_schema, open_engine

    texts = {"u1": "Je suis à l'École", "u2": "ΣΟΦΙΑ είναι εδώ", "u3": "Москва", "u4": "100% off_sale\\"}
    engine = open_engine(database_url)
    ensure_schema(engine)
    rows = [
        normalize_conversation(
            {"id": i, "created_at": "2024-05-01T08:00:00Z", "messages": [{"role": "user", "content": t}]},
            "bot",
            WhatsAppRule(),
        )
        for i, t in texts.items()
    ]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))
    engine.dispose()
    env = {"CHATSYNC_DATABASE_URL": database_url}

    def found(needle: str) -> list[str]:
        return sorted(
            r["id"] for r in json.loads(cli("list", "--search", needle, "--format", "json", env=env).stdout)
        )

    assert found("école") == ["u1"]
    assert found("σοφια") == ["u2"]
    assert found("МОСКВА") == ["u3"]
    assert found("0% off_") == ["u4"] and found("_sale\\") == ["u4"]  # LIKE's wildcards mean nothing here
    assert found("x%y") == []


def test_tables_show_control_characters_and_markup_as_text_never_act_on_them(cli: Any, engine: Any) -> None:
    """A message or customer name holding ESC sequences (colour, window title, clear screen), bidi overrides
    or rich markup is drawn as what it is; the machine formats keep it exactly."""
    hostile = _conversation(
        "c\x1b[2Jx",
        "2024-05-01T08:00:00Z",
        source="Web\x1b[31m",
        reply="6123 4567 \x1b]0;pwned\x07ok",
        customer="[red]Eve\u202eevil",
        words="\x9b2J and \x7f",
    )
    hostile["messages"].append({"role": "\x1b]0;role\x07\x1b[2J", "content": "from a role"})
    row = normalize_conversation(hostile, "bot-a", WhatsAppRule())
    with engine.begin() as connection:
        writes.upsert_conversations(connection, [row], datetime.now(UTC))
    # wide enough for every column whole, whatever terminal (or none) the tests run under
    env = {"CHATSYNC_DATABASE_URL": engine.url.render_as_string(hide_password=False), "COLUMNS": "200"}
    outputs = {
        "list": cli("list", "--format", "table", env=env),
        "show": cli("show", "c\x1b[2Jx", "--format", "table", env=env),
        "report": cli(
            "report", "--since", "2024-05-01", "--until", "2024-05-01", "--format", "table", env=env
        ),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.stderr)
        drawn = result.stdout
        for acting in ("\x1b", "\x07", "\x9b", "\x7f", "\u202e"):
            assert acting not in drawn, (name, acting)
        assert "␛" in drawn, name  # shown, not acted on
    assert "[red]Eve" in outputs["list"].stdout and "[red]Eve" in outputs["show"].stdout  # not markup
    assert "␛]0;pwned␇ok" in outputs["show"].stdout
    unknown = cli("show", "no\x1b]0;such\x07id", env=env)
    assert unknown.exit_code != 0 and "\x1b" not in unknown.stderr and "\x07" not in unknown.stderr
    exact = json.loads(cli("list", "--format", "json", env=env).stdout)
    assert exact[0]["id"] == "c\x1b[2Jx" and exact[0]["customer"] == "[red]Eve\u202eevil"


def test_a_senders_number_from_any_country_can_be_looked_up_but_is_set_by_the_rule(
    cli: Any, engine: Any
) -> None:
    """Sync stores a WhatsApp sender's number from any country; support staff must find it by that number.
    Setting one by hand still follows the rule (and its error names the setting that widens it)."""
    raw = _conversation("my1", "2024-05-01T08:00:00Z", reply="no thanks", userId="+60123511338")
    row = normalize_conversation(raw, "bot-a", WhatsAppRule())
    assert (row["wa_channel"], row["auto_number"]) == ("+60123511338", "+60123511338")
    with engine.begin() as connection:
        writes.upsert_conversations(connection, [row], datetime.now(UTC))
    env = {"CHATSYNC_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    for written in ("+60123511338", "+60 12-351 1338", " +60 (12) 351 1338 "):
        found = cli("list", "--number", written, "--format", "json", env=env)
        assert found.exit_code == 0, found.stderr
        assert [r["id"] for r in json.loads(found.stdout)] == ["my1"], written
    for not_a_lookup in ("60123511338", "+60 12 351 1338 ext", "+999 1234 5678"):
        refused = cli("list", "--number", not_a_lookup, env=env)
        assert refused.exit_code == ExitCode.USAGE, not_a_lookup
    manual = cli("set-whatsapp", "my1", "+60123511338", env=env)
    assert manual.exit_code == ExitCode.USAGE
    assert "CHATSYNC_ACCEPTED_REGIONS" in manual.stderr and "852, 853 or 65" in manual.stderr
