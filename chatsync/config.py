"""Settings and their precedence: command-line flag > environment variable > ``.env`` file > default.

Every setting is declared once, in :data:`SETTINGS` (its name, variables, flag, whether it is secret, its
parser); its default is the field default of :class:`Settings`. :func:`load_settings` reads them all the
same way and records in ``Settings.origins`` where each value came from, so every command (and ``serve``)
sees the same settings whether they are flags, exported variables or lines of ``.env``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chatsync.errors import ConfigError, MissingSetting, UsageError
from chatsync.timeutil import format_duration, parse_duration

DEFAULT_BASE_URL = "https://www.chatbase.co/api/v1"
DEFAULT_API_URL = "https://www.chatbase.co/api/v2"  # as Chatbase's own CLI names it: CHATBASE_API_URL
API_VERSIONS = ("v1", "v2")
DEFAULT_CLERK_API_URL = "https://api.clerk.com/v1"
DEFAULT_LOOKBACK = "3d"
DEFAULT_RETRY_BUDGET = "5m"
LOG_FORMATS = ("text", "json")


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def default_database_path() -> Path:
    """The SQLite file used when no database URL is configured (the user's data directory)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("chatsync", appauthor=False)) / "chatsync.db"


def default_database_url() -> str:
    return f"sqlite:///{default_database_path()}"


def normalize_database_url(url: str) -> str:
    """Make ``postgres://`` and ``postgresql://`` URLs (as Supabase hands them out) use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile", "token", "key", "secret", "api_key"})


def mask_url(url: str) -> str:
    """A database or HTTP URL safe to print: the password of its user and any query value that names a
    secret (``?password=``, ``?sslpassword=``, ``?token=``…) replaced by ``***``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*:/@"
        )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide (and sqlite:////path must keep its four slashes)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class WhatsAppRule:
    """Settings of the extraction rule (docs/whatsapp.md)."""

    default_region: str = "HK"
    accepted_regions: tuple[str, ...] = ("HK", "MO", "SG")
    validation: str = "strict"  # strict | off
    prompt_window: int = 3
    extra_prompt_patterns: tuple[str, ...] = ()


class Origin(NamedTuple):
    """Where a setting's value came from: ``flag``, ``env``, ``.env`` or ``default``, and which variable."""

    kind: str
    variable: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.variable}" if self.variable else self.kind


DEFAULT = Origin("default")


@dataclass(frozen=True)
class Settings:
    """Every setting of chatsync; built by :func:`load_settings`, or directly in tests."""

    database_url: str = field(default_factory=default_database_url)
    api_key: Secret | None = None
    chatbot_ids: tuple[str, ...] = ()
    base_url: str = DEFAULT_BASE_URL
    api_version: str = "v1"  # v1 (get-conversations) or v2 (the conversations export)
    api_url: str = DEFAULT_API_URL
    timezone: str = "UTC"
    whatsapp: WhatsAppRule = field(default_factory=WhatsAppRule)
    lookback: timedelta = field(default_factory=lambda: parse_duration(DEFAULT_LOOKBACK))
    retry_budget: timedelta = field(default_factory=lambda: parse_duration(DEFAULT_RETRY_BUDGET))
    rate_limit_requests: int = 100
    rate_limit_seconds: float = 10.0
    concurrency: int = 8
    heartbeat_url: Secret | None = None
    # the HTTP API (`chatsync serve`) and `chatsync users sync`
    clerk_jwt_key: str | None = None
    clerk_jwks_url: str | None = None
    jwks_cache: timedelta = timedelta(minutes=5)
    clerk_issuer: str | None = None
    clerk_authorized_parties: tuple[str, ...] = ()
    clerk_webhook_secret: Secret | None = None
    chatbase_webhook_secret: Secret | None = None
    clerk_secret_key: Secret | None = None
    clerk_api_url: str = DEFAULT_CLERK_API_URL
    admin_user_ids: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    sentry_dsn: Secret | None = None
    log_format: str = "text"
    events_per_user: int = 5
    events_poll: timedelta = timedelta(seconds=1)
    # where each value came from, by setting name (absent: the default)
    origins: Mapping[str, Origin] = field(default_factory=dict, compare=False, repr=False)

    def require_api_key(self) -> Secret:
        if not self.api_key:
            raise MissingSetting("CHATBASE_API_KEY", "--api-key")
        return self.api_key

    def require_chatbot_ids(self) -> tuple[str, ...]:
        if not self.chatbot_ids:
            raise MissingSetting("CHATBASE_CHATBOT_ID", "--chatbot-id")
        return self.chatbot_ids

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        """The browser origins CORS lets in: CHATSYNC_CORS_ORIGINS, else those of the authorized parties."""
        return self.cors_origins or tuple(dict.fromkeys(_origin(p) for p in self.clerk_authorized_parties))

    def origin_of(self, name: str) -> Origin:
        """Where the setting ``name`` (a :data:`SETTINGS` name) came from."""
        return self.origins.get(name, DEFAULT)


# ---------------------------------------------------------------------------------------------- parsers
def _split_list(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out: list[str] = []
    for item in items:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return tuple(dict.fromkeys(out))


def chatbot_id(text: str) -> str:
    """A chatbot id as chatsync stores it: at most 128 characters, no control characters."""
    if not text or len(text) > 128 or any(not c.isprintable() for c in text):
        raise UsageError(f"invalid chatbot id {text[:40]!r}: expected up to 128 printable characters")
    return text


def validate_timezone(name: str) -> str:
    """An IANA time zone name as the system's database spells it (``utc`` and ``asia/hong_kong`` are
    ``UTC`` and ``Asia/Hong_Kong``); a UsageError for any other text."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # a folder name or an overlong name is an OSError
        from zoneinfo import available_timezones

        spelled = {zone.lower(): zone for zone in available_timezones()}.get(name.strip().lower())
        if spelled is not None:
            return spelled
        raise UsageError(
            f"unknown time zone {name!r}: expected an IANA name such as UTC or Asia/Hong_Kong"
        ) from None
    return name


def _parse_rate(text: str) -> tuple[int, float]:
    try:
        count, _, span = text.partition("/")
        requests, seconds = int(count), parse_duration(span or "10s").total_seconds()
    except (ValueError, UsageError):
        raise UsageError(f"invalid rate limit {text!r}: expected requests/span, e.g. 100/10s") from None
    if requests < 1 or seconds <= 0:
        raise UsageError(f"invalid rate limit {text!r}: expected at least 1 request in a span longer than 0")
    return requests, seconds


def _origin(text: str) -> str:
    """``scheme://host[:port]`` of a URL, as browsers send it in ``Origin``."""
    from urllib.parse import urlsplit

    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise UsageError(f"invalid origin {text!r}: expected an exact origin such as https://app.example.com")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _origins(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_origin(o) for o in _split_list(value)))


def _whole(name: str, minimum: int = 1, maximum: int = 1_000_000) -> Callable[[object], int]:
    def parse(value: object) -> int:
        try:
            number = int(str(value))
        except ValueError:
            raise UsageError(f"invalid {name} {value!r}: expected a whole number") from None
        if not minimum <= number <= maximum:
            raise UsageError(f"invalid {name} {value!r}: expected {minimum} to {maximum:,}")
        return number

    return parse


def _at_least(name: str, least: timedelta) -> Callable[[object], timedelta]:
    def parse(value: object) -> timedelta:
        span = _duration(value)
        if span < least:
            raise UsageError(f"invalid {name} {value!r}: expected at least {format_duration(least)}")
        return span

    return parse


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise UsageError(f"invalid {name} {value!r}: expected {' or '.join(choices)}")
        return text

    return parse


def api_version(value: object) -> str:
    """``v1`` or ``v2`` from ``1``, ``2``, ``v1``, ``v2`` (any case); else a UsageError."""
    text = str(value).strip().lower()
    text = f"v{text}" if text in ("1", "2") else text
    if text not in API_VERSIONS:
        raise UsageError(f"invalid Chatbase API version {value!r}: expected 1 or 2")
    return text


def _duration(value: object) -> timedelta:
    return value if isinstance(value, timedelta) else parse_duration(str(value))


def _pem(value: object) -> str:
    return str(value).replace("\\n", "\n").strip()


def _text(value: object) -> str:
    return str(value).strip()


def _secret(value: object) -> Secret:
    return value if isinstance(value, Secret) else Secret(str(value))


def api_key(value: object) -> Secret:
    """A Chatbase key as an HTTP header carries it: the whitespace around it dropped (a secrets file's
    final newline or CR), then printable ASCII only. A UsageError otherwise, which never shows the key
    (an illegal header once printed it, escaped, past the masking, into errors and sync_runs)."""
    text = value.reveal() if isinstance(value, Secret) else str(value)
    text = text.strip(" \t\r\n\f\v")
    bad = next((c for c in text if not "!" <= c <= "~"), None)
    if bad is not None:
        kind = (
            "a space"
            if bad == " "
            else "a control character"
            if ord(bad) < 32 or ord(bad) == 127
            else "a non-ASCII character"
        )
        raise UsageError(
            f"the Chatbase key holds {kind} (not shown here), which no key has: copy the key again"
        )
    return Secret(text)


def http_url(what: str, example: str) -> Callable[[object], str]:
    """A parser for an http(s) URL setting, without its final ``/``; a UsageError naming ``what``
    otherwise (the URL shown with any password masked): a scheme httpx cannot send to was once taken
    for an outage and retried for the whole retry budget."""

    def parse(value: object) -> str:
        from urllib.parse import urlsplit

        text = str(value).strip().rstrip("/")
        try:
            parts = urlsplit(text)
            _ = parts.port  # a port that is not a number, or out of range, is a ValueError
            fine = (
                parts.scheme.lower() in ("http", "https")
                and bool(parts.hostname)
                and not any(c.isspace() for c in parts.netloc)
            )
        except ValueError:  # e.g. an unclosed [ of an IPv6 address, port 99999 or 8742:80
            fine = False
        if not fine:
            raise UsageError(f"invalid {what} {mask_url(text)!r}: expected an http(s) URL such as {example}")
        return text

    return parse


# ---------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Setting:
    """One setting: its name (the key of flag overrides and of ``Settings.origins``), the variables read
    for it (the first one set wins), its flag, whether it is secret, and how its text is parsed.

    ``field`` is the :class:`Settings` attribute it sets (default: the name); ``whatsapp.X`` sets the
    rule's ``X``; a parser may return several fields at once as a dict.
    """

    name: str
    env: tuple[str, ...]
    help: str
    flag: str | None = None
    parse: Callable[[object], Any] = _text
    secret: bool = False
    field: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database_url",
        ("CHATSYNC_DATABASE_URL", "DATABASE_URL"),
        "SQLAlchemy URL of the database",
        "--database-url",
        lambda v: normalize_database_url(str(v).strip()),
    ),
    Setting("api_key", ("CHATBASE_API_KEY",), "Chatbase secret key", "--api-key", api_key, secret=True),
    Setting(
        "chatbot_ids",
        ("CHATBASE_CHATBOT_ID",),
        "chatbots to sync",
        "--chatbot-id",
        lambda v: tuple(map(chatbot_id, _split_list(v))),
    ),
    Setting(
        "base_url",
        ("CHATBASE_BASE_URL",),
        "Chatbase API root",
        "--base-url",
        http_url("Chatbase API root", DEFAULT_BASE_URL),
    ),
    Setting(
        "api_version",
        ("CHATBASE_API_VERSION",),
        "which Chatbase API sync reads: 1 (get-conversations) or 2 (the conversations export)",
        "--api",
        api_version,
    ),
    Setting(
        "api_url",
        ("CHATBASE_API_URL",),
        "Chatbase API v2 root",
        parse=http_url("Chatbase API v2 root", DEFAULT_API_URL),
    ),
    Setting(
        "region",
        ("CHATSYNC_DEFAULT_REGION",),
        "region of 8-digit numbers written without country code",
        "--region",
        lambda v: str(v).strip().upper(),
        field="whatsapp.default_region",
    ),
    Setting(
        "timezone",
        ("CHATSYNC_TIMEZONE",),
        "time zone of report days",
        "--tz",
        lambda v: validate_timezone(str(v)),
    ),
    Setting(
        "lookback",
        ("CHATSYNC_LOOKBACK",),
        "how far before the checkpoint to fetch again",
        "--lookback",
        _duration,
    ),
    Setting(
        "retry_budget",
        ("CHATSYNC_RETRY_BUDGET",),
        "how long sync rides out an outage",
        "--retry-budget",
        _duration,
    ),
    Setting(
        "concurrency",
        ("CHATSYNC_CONCURRENCY",),
        "requests in flight at once",
        "--concurrency",
        _whole("concurrency", 1, 64),
    ),
    Setting(
        "rate_limit",
        ("CHATSYNC_RATE_LIMIT",),
        "client-side request limit",
        parse=lambda v: dict(
            zip(("rate_limit_requests", "rate_limit_seconds"), _parse_rate(str(v)), strict=True)
        ),
    ),
    Setting(
        "accepted_regions",
        ("CHATSYNC_ACCEPTED_REGIONS",),
        "country codes a number may carry",
        parse=lambda v: tuple(r.upper() for r in _split_list(v)),
        field="whatsapp.accepted_regions",
    ),
    Setting(
        "validation",
        ("CHATSYNC_WHATSAPP_VALIDATION",),
        "strict (phonenumbers metadata) or off",
        parse=_one_of("validation mode", ("strict", "off")),
        field="whatsapp.validation",
    ),
    Setting(
        "prompt_patterns",
        ("CHATSYNC_PROMPT_PATTERNS",),
        "extra regular expressions that mark the bot's WhatsApp prompt",
        parse=lambda v: tuple(str(p) for p in str(v).split("\n") if p.strip()),
        field="whatsapp.extra_prompt_patterns",
    ),
    # the HTTP API
    Setting("clerk_jwt_key", ("CLERK_JWT_KEY",), "PEM public key of the Clerk instance", parse=_pem),
    Setting("clerk_jwks_url", ("CLERK_JWKS_URL",), "JWKS URL of the Clerk instance (instead of the PEM)"),
    Setting(
        "jwks_cache",
        ("CHATSYNC_JWKS_CACHE",),
        "how long the JWKS key set is trusted before it is fetched again",
        parse=_duration,
    ),
    Setting("clerk_issuer", ("CLERK_ISSUER",), "Frontend API URL of the Clerk instance"),
    Setting(
        "clerk_authorized_parties",
        ("CLERK_AUTHORIZED_PARTIES",),
        "exact origins of the frontend",
        parse=_split_list,
    ),
    Setting(
        "clerk_webhook_secret",
        ("CLERK_WEBHOOK_SIGNING_SECRET",),
        "signing secret of the Clerk webhook",
        parse=_secret,
        secret=True,
    ),
    Setting(
        "chatbase_webhook_secret",
        ("CHATBASE_WEBHOOK_SECRET",),
        "secret that signs Chatbase's leads.submit webhook (x-chatbase-signature)",
        parse=_secret,
        secret=True,
    ),
    Setting(
        "clerk_secret_key", ("CLERK_SECRET_KEY",), "Clerk secret key (users sync)", parse=_secret, secret=True
    ),
    Setting(
        "clerk_api_url", ("CLERK_API_URL",), "Clerk Backend API root", parse=lambda v: str(v).rstrip("/")
    ),
    Setting(
        "admin_user_ids", ("CHATSYNC_ADMIN_USER_IDS",), "Clerk users who see everything", parse=_split_list
    ),
    Setting(
        "cors_origins",
        ("CHATSYNC_CORS_ORIGINS",),
        "browser origins allowed to call the API (default: those of CLERK_AUTHORIZED_PARTIES)",
        parse=_origins,
    ),
    Setting(
        "sentry_dsn",
        ("SENTRY_DSN",),
        "Sentry DSN for the errors of sync and serve",
        parse=_secret,
        secret=True,
    ),
    Setting(
        "heartbeat_url",
        ("CHATSYNC_HEARTBEAT_URL",),
        "pinged after every sync with its summary line (…/fail on failure)",
        parse=_secret,
        secret=True,
    ),
    Setting(
        "log_format",
        ("CHATSYNC_LOG_FORMAT",),
        "text or json",
        "--log-format",
        _one_of("log format", LOG_FORMATS),
    ),
    Setting(
        "events_per_user",
        ("CHATSYNC_EVENTS_PER_USER",),
        "open event streams allowed per user and server process",
        parse=_whole("streams per user", 1, 10_000),
    ),
    Setting(
        "events_poll",
        ("CHATSYNC_EVENTS_POLL",),
        "how often the change feed looks for changes made elsewhere",
        parse=_at_least("events poll", timedelta(milliseconds=100)),
    ),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


# -------------------------------------------------------------------------------------------------- load
def _present(value: object) -> bool:
    return value not in (None, "", (), [])


def _blank(value: object) -> bool:
    """A value given, but empty or only spaces (a list: every item so)."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple) and value:
        return all(isinstance(v, str) and not v.strip() for v in value)
    return False


def load_settings(
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> Settings:
    """Build settings from flag values (by setting name; ``None`` when not given), the environment and
    ``./.env``; ``origins`` records where each value came from. Raises UsageError naming a bad value."""
    dotenv = _dotenv(dotenv_path)
    flags = overrides or {}
    environment = os.environ if env is None else env

    values: dict[str, Any] = {}
    rule: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for setting in SETTINGS:
        found: tuple[object, Origin] | None = None
        given = flags.get(setting.name)
        if setting.flag and _blank(given):
            # `--tz ""` once quietly meant "unset", and `--chatbot-id ''` said the variable was not set
            raise UsageError(f"{setting.flag} is empty: give a value, or leave the option out")
        if _present(given):
            found = (flags[setting.name], Origin("flag", setting.flag))
        else:
            for kind, source in (("env", environment), (".env", dotenv)):
                variable = next((v for v in setting.env if _present(source.get(v))), None)
                if variable is not None:
                    found = (source[variable], Origin(kind, variable))
                    break
        if found is None:
            continue
        try:
            parsed = setting.parse(found[0])
        except UsageError as exc:  # say where the bad value is: the flag, or which variable (and file)
            where = found[1].variable if found[1].kind != ".env" else f"{found[1].variable} in .env"
            raise UsageError(f"{where}: {exc}") from None
        origins[setting.name] = found[1]
        target = setting.field or setting.name
        if isinstance(parsed, dict):
            values.update(parsed)
        elif target.startswith("whatsapp."):
            rule[target.removeprefix("whatsapp.")] = parsed
        else:
            values[target] = parsed
    if rule:
        from chatsync.whatsapp import check_rule

        values["whatsapp"] = check_rule(WhatsAppRule(**rule))
    return Settings(**values, origins=origins)


class SettingRow(NamedTuple):
    """One line of ``chatsync config show``: a setting as it may be printed, and where it came from."""

    name: str
    variables: tuple[str, ...]
    flag: str | None
    value: str
    origin: Origin


def describe_settings(settings: Settings) -> list[SettingRow]:
    """Every declared setting with its value safe to print (secrets masked, URL passwords hidden)."""
    rows = []
    for setting in SETTINGS:
        target = setting.field or setting.name
        if setting.name == "rate_limit":
            value: object = f"{settings.rate_limit_requests}/{settings.rate_limit_seconds:g}s"
        elif target.startswith("whatsapp."):
            value = getattr(settings.whatsapp, target.removeprefix("whatsapp."))
        else:
            value = getattr(settings, target)
        if setting.secret:
            shown = "***" if value else ""
        elif setting.name == "database_url" or (isinstance(value, str) and "://" in value):
            shown = mask_url(str(value))
        elif isinstance(value, tuple):
            shown = ",".join(map(str, value))
        elif isinstance(value, timedelta):
            shown = format_duration(value)
        else:
            shown = "" if value is None else str(value)
        rows.append(
            SettingRow(setting.name, setting.env, setting.flag, shown, settings.origin_of(setting.name))
        )
    return rows


def _dotenv(path: Path | None) -> dict[str, str]:
    """The variables a ``.env`` file at ``path`` (None: ``./.env``) sets ({} when there is none). Raises
    ConfigError when it is there but cannot be read (no permission for the user running chatsync, not
    UTF-8), or when the current folder is gone."""
    from dotenv import dotenv_values

    try:
        path = path if path is not None else Path.cwd() / ".env"
    except OSError as exc:
        raise ConfigError(f"cannot read ./.env: the current folder is gone ({exc.strerror or exc})") from None
    try:
        if not path.is_file():  # (a symlink into a folder this user cannot enter fails here)
            return {}
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror or exc}; it must be readable by the user running chatsync"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {path}: it is not UTF-8 text") from None


def log_format(env: Mapping[str, str] | None = None, dotenv_path: Path | None = None) -> str:
    """``CHATSYNC_LOG_FORMAT`` from the environment, else ``./.env``; ``text`` when unset or unknown
    (the log must never stop a command)."""
    value = (os.environ if env is None else env).get("CHATSYNC_LOG_FORMAT")
    if not value:
        try:
            value = _dotenv(dotenv_path).get("CHATSYNC_LOG_FORMAT")
        except ConfigError:
            value = None  # (the command itself then says what is wrong with the file)
    value = (value or "text").strip().lower()
    return value if value in LOG_FORMATS else "text"
