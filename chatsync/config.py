"""Settings and their precedence: command-line flag > environment variable > ``.env`` file > default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chatsync.errors import MissingSetting, UsageError
from chatsync.timeutil import parse_duration

DEFAULT_BASE_URL = "https://www.chatbase.co/api/v1"
DEFAULT_LOOKBACK = "3d"
DEFAULT_RETRY_BUDGET = "5m"


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


def mask_url(url: str) -> str:
    """The database URL with its password replaced, safe to print."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


@dataclass(frozen=True)
class WhatsAppRule:
    """Settings of the extraction rule (docs/whatsapp.md)."""

    default_region: str = "HK"
    accepted_regions: tuple[str, ...] = ("HK", "MO", "SG")
    validation: str = "strict"  # strict | off
    prompt_window: int = 3
    extra_prompt_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=default_database_url)
    api_key: Secret | None = None
    chatbot_ids: tuple[str, ...] = ()
    base_url: str = DEFAULT_BASE_URL
    timezone: str = "UTC"
    whatsapp: WhatsAppRule = field(default_factory=WhatsAppRule)
    lookback: timedelta = field(default_factory=lambda: parse_duration(DEFAULT_LOOKBACK))
    retry_budget: timedelta = field(default_factory=lambda: parse_duration(DEFAULT_RETRY_BUDGET))
    rate_limit_requests: int = 100
    rate_limit_seconds: float = 10.0
    concurrency: int = 8
    heartbeat_url: Secret | None = None
    sentry_dsn: Secret | None = None

    def require_api_key(self) -> Secret:
        if not self.api_key:
            raise MissingSetting("CHATBASE_API_KEY", "--api-key")
        return self.api_key

    def require_chatbot_ids(self) -> tuple[str, ...]:
        if not self.chatbot_ids:
            raise MissingSetting("CHATBASE_CHATBOT_ID", "--chatbot-id")
        return self.chatbot_ids


class _Sources:
    """Looks a setting up in flag overrides, then the environment, then ``.env``."""

    def __init__(self, overrides: Mapping[str, object], env: Mapping[str, str], dotenv: Mapping[str, str]):
        self.overrides = overrides
        self.env = env
        self.dotenv = dotenv

    def get(self, flag: str, *variables: str) -> object | None:
        value = self.overrides.get(flag)
        if value not in (None, (), []):
            return value
        for source in (self.env, self.dotenv):
            for variable in variables:
                text = source.get(variable)
                if text not in (None, ""):
                    return text
        return None


def _split_list(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out: list[str] = []
    for item in items:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return tuple(dict.fromkeys(out))


def validate_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # a folder name or an overlong name is an OSError
        raise UsageError(
            f"unknown time zone {name!r}: expected an IANA name such as UTC or Asia/Hong_Kong"
        ) from None
    return name


def _parse_rate(text: str) -> tuple[int, float]:
    try:
        count, _, span = text.partition("/")
        return int(count), parse_duration(span or "10s").total_seconds()
    except (ValueError, UsageError):
        raise UsageError(f"invalid rate limit {text!r}: expected requests/span, e.g. 100/10s") from None


LOG_FORMATS = ("text", "json")


def log_format(env: Mapping[str, str] | None = None, dotenv_path: Path | None = None) -> str:
    """``CHATSYNC_LOG_FORMAT`` from the environment, else ``./.env``; ``text`` when unset or unknown
    (the log must never stop a command)."""
    value = (os.environ if env is None else env).get("CHATSYNC_LOG_FORMAT")
    if not value:
        path = dotenv_path if dotenv_path is not None else Path.cwd() / ".env"
        if path.is_file():
            from dotenv import dotenv_values

            value = dotenv_values(path).get("CHATSYNC_LOG_FORMAT")
    value = (value or "text").strip().lower()
    return value if value in LOG_FORMATS else "text"


def load_settings(
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> Settings:
    """Build settings from flag values (``None`` when not given), the environment and ``./.env``."""
    from dotenv import dotenv_values

    path = dotenv_path if dotenv_path is not None else Path.cwd() / ".env"
    dotenv = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.is_file() else {}
    src = _Sources(overrides or {}, os.environ if env is None else env, dotenv)

    values: dict[str, object] = {}
    url = src.get("database_url", "CHATSYNC_DATABASE_URL", "DATABASE_URL")
    if url:
        values["database_url"] = normalize_database_url(str(url))
    key = src.get("api_key", "CHATBASE_API_KEY")
    if key:
        values["api_key"] = Secret(str(key))
    bots = src.get("chatbot_ids", "CHATBASE_CHATBOT_ID")
    if bots:
        values["chatbot_ids"] = _split_list(bots)
    base = src.get("base_url", "CHATBASE_BASE_URL")
    if base:
        values["base_url"] = str(base).rstrip("/")
    tz = src.get("timezone", "CHATSYNC_TIMEZONE")
    if tz:
        values["timezone"] = validate_timezone(str(tz))

    rule: dict[str, object] = {}
    region = src.get("region", "CHATSYNC_DEFAULT_REGION")
    if region:
        rule["default_region"] = str(region).upper()
    regions = src.get("accepted_regions", "CHATSYNC_ACCEPTED_REGIONS")
    if regions:
        rule["accepted_regions"] = tuple(r.upper() for r in _split_list(regions))
    validation = src.get("validation", "CHATSYNC_WHATSAPP_VALIDATION")
    if validation:
        if str(validation) not in ("strict", "off"):
            raise UsageError(f"invalid validation mode {validation!r}: expected strict or off")
        rule["validation"] = str(validation)
    patterns = src.get("prompt_patterns", "CHATSYNC_PROMPT_PATTERNS")
    if patterns:
        rule["extra_prompt_patterns"] = tuple(str(p) for p in str(patterns).split("\n") if p.strip())
    if rule:
        from chatsync.whatsapp import check_rule

        values["whatsapp"] = check_rule(WhatsAppRule(**rule))  # type: ignore[arg-type]

    lookback = src.get("lookback", "CHATSYNC_LOOKBACK")
    if lookback:
        values["lookback"] = parse_duration(str(lookback))
    budget = src.get("retry_budget", "CHATSYNC_RETRY_BUDGET")
    if budget:
        values["retry_budget"] = parse_duration(str(budget))
    rate = src.get("rate_limit", "CHATSYNC_RATE_LIMIT")
    if rate:
        values["rate_limit_requests"], values["rate_limit_seconds"] = _parse_rate(str(rate))
    concurrency = src.get("concurrency", "CHATSYNC_CONCURRENCY")
    if concurrency:
        try:
            values["concurrency"] = max(1, int(str(concurrency)))
        except ValueError:
            raise UsageError(f"invalid concurrency {concurrency!r}: expected a whole number") from None
    heartbeat = src.get("heartbeat_url", "CHATSYNC_HEARTBEAT_URL")
    if heartbeat:
        values["heartbeat_url"] = Secret(str(heartbeat))
    dsn = src.get("sentry_dsn", "SENTRY_DSN")
    if dsn:
        values["sentry_dsn"] = Secret(str(dsn))
    return Settings(**values)  # type: ignore[arg-type]
