"""The WhatsApp-number rule (docs/whatsapp.md), as pure functions.

The bot asks for the user's WhatsApp number; the user's next reply may hold an 8-digit number. Support
staff must be able to trust what is stored, so every step is explicit and every rejected candidate keeps
the reason it was rejected (``chatsync extract-test`` shows them).

Steps: recognise the prompt (:func:`is_prompt`), take the first user reply after it, normalise it
(:func:`normalize_text`: invisible characters out first), cut candidates that are never trimmed
(``_cut``), reject by context, check shape and country code (digits right after a bare ``+65`` are that
code's, never the default region's), validate, then deduplicate (:func:`extract_reply`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from chatsync.config import WhatsAppRule
from chatsync.errors import InvalidNumber, UsageError

# Outcomes stored per conversation (analytics.md counts them).
CAPTURED = "captured"
NO_PROMPT = "no_prompt"
NO_REPLY = "no_reply"
NOT_FOUND = "not_found"
AMBIGUOUS = "ambiguous"
OUTCOMES = (CAPTURED, NO_PROMPT, NO_REPLY, NOT_FOUND, AMBIGUOUS)

# First national digit allowed when validation is "off", by country code.
FIRST_DIGITS = {"852": "456789", "853": "6", "65": "89"}

_DASHES = {chr(c) for c in range(0x2010, 0x2016)} | {"\u2212", "\uff0d", "\ufe63", "\u2043"}
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\uff07": "'"}


# ---------------------------------------------------------------------------------------------- normalising
@dataclass(frozen=True)
class Normalized:
    """Normalised text plus, for each of its characters, the index of the original character."""

    text: str
    origin: tuple[int, ...]
    original: str

    def original_span(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        first = self.origin[start]
        last = self.origin[end - 1]
        return self.original[first : last + 1]


# Characters drawn as nothing, removed before anything else: every format character (category Cf: zero-width
# space and joiners, direction marks, embeddings and isolates, word joiner, BOM, soft hyphen, tags) and the
# rest of what Unicode calls default-ignorable (DerivedCoreProperties.txt): the variation selectors
# (U+FE00-FE0F, U+E0100-E01EF, Mongolian U+180B-180F), the combining grapheme joiner, the Hangul fillers
# and the Khmer inherent vowels. Numbers pasted from contacts, PDFs and chat apps carry them, and left in
# place they split a number or part a country code from its digits.
_IGNORABLE = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x2065, 0x2065),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),
)


def _is_invisible(ch: str) -> bool:
    """Is this one character a format character (Cf) or otherwise default-ignorable (variation selectors…)?"""
    if unicodedata.category(ch) == "Cf":
        return True
    code = ord(ch)
    return any(low <= code <= high for low, high in _IGNORABLE)


@lru_cache(maxsize=8192)
def _normalize_char(ch: str) -> str:
    """One character's normal form; cached because chat text repeats the same few thousand characters."""
    if ch.isascii():
        return ch
    if _is_invisible(ch):
        return ""
    out = []
    for c in unicodedata.normalize("NFKC", ch):
        if _is_invisible(c):
            continue
        if c.isascii():
            out.append(c)
        elif c in _DASHES:
            out.append("-")
        elif c in _QUOTES:
            out.append(_QUOTES[c])
        elif unicodedata.category(c) == "Nd":
            out.append(str(unicodedata.decimal(c)))
        elif unicodedata.category(c) == "Zs":
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def normalize_text(text: str) -> Normalized:
    """The text the rule reads, with a map back to ``text`` for each of its characters.

    Invisible characters (format characters, variation selectors: see ``_IGNORABLE``) are removed; then NFKC, every decimal digit to 0-9, dash
    variants to ``-``, Unicode spaces to a space. ``original_span`` gives back the original text of a span,
    invisible characters inside it included.
    """
    if text.isascii():
        return Normalized(text, tuple(range(len(text))), text)
    chars: list[str] = []
    origin: list[int] = []
    for index, ch in enumerate(text):
        for c in _normalize_char(ch):
            chars.append(c)
            origin.append(index)
    return Normalized("".join(chars), tuple(origin), text)


# --------------------------------------------------------------------------------------------------- prompt
_WHATSAPP_WORD = re.compile(r"whats?app|whatsap|what's\s?app\b|(?<![a-z])wa(?![a-z])")
_NUMBER_WORD = re.compile(
    r"(?<![a-z])(?:number|no\.|num|phone|contact|n[uú]mero|nombor|nomor|numéro|nummer)"
    r"|電話|电话|號碼|号码|手機|手机|聯絡|联络|联系|番号|번호"
)
_REQUEST_CUE = re.compile(
    r"\?|(?<![a-z])(?:please|may i|could you|can you|what is your|your|provide|share|leave|enter"
    r"|por favor|tu|su|anda)(?![a-z])"
    r"|請|请|麻煩|麻烦|可否|可以|提供|留下|輸入|输入|告訴|告诉|你的|您的|閣下|幾多|多少"
)
_SECOND_PERSON = re.compile(r"(?<![a-z])(?:your|tu|su|anda)(?![a-z])|你的|您的|閣下")


@lru_cache(maxsize=64)
def _compiled_extra(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


# Bots repeat themselves (a greeting, the prompt they were told to send), so the verdicts on the last
# messages asked about are kept: up to 1,024 messages of up to 1,000 characters (a few MB at most).
_REMEMBERED_PROMPT_CHARS = 1000


def is_prompt(message: str, rule: WhatsAppRule | None = None) -> bool:
    """Is this assistant message the bot asking for the user's WhatsApp number?"""
    rule = rule or WhatsAppRule()
    if len(message) > _REMEMBERED_PROMPT_CHARS:
        return _is_prompt(message, rule)
    return _remembered_is_prompt(message, rule)


def _is_prompt(message: str, rule: WhatsAppRule) -> bool:
    text = message if message.isascii() else normalize_text(message).text  # (ASCII: already normal)
    lowered = text.lower()
    if any(p.search(text) for p in _compiled_extra(rule.extra_prompt_patterns)):
        return True
    if not (_WHATSAPP_WORD.search(lowered) and _NUMBER_WORD.search(lowered) and _REQUEST_CUE.search(lowered)):
        return False
    # A bot message carrying a long number of its own and not addressing the user is an advertisement.
    advertises = any(c.digit_count >= 8 for c in _cut(text))
    return not (advertises and not _SECOND_PERSON.search(lowered))


_remembered_is_prompt = lru_cache(maxsize=1024)(_is_prompt)


# ----------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class _Span:
    start: int  # includes a leading "+", "(", "(+" or "+("
    end: int  # includes a closing ")"
    digits_start: int
    groups: tuple[str, ...]
    lead: str
    explicit: bool  # the country code is marked, by "+" or a leading "00"

    @property
    def digit_count(self) -> int:
        return sum(len(g) for g in self.groups)


_DIGIT_RUN = re.compile(r"[0-9]+")
_JOINERS = set(" -.()")


def _joinable(gap: str) -> bool:
    return 1 <= len(gap) <= 3 and set(gap) <= _JOINERS and (gap.count("-") + gap.count(".")) <= 1


def _cut(text: str) -> list[_Span]:
    runs = [(m.start(), m.end()) for m in _DIGIT_RUN.finditer(text)]
    spans: list[_Span] = []
    i = 0
    while i < len(runs):
        first = i
        while i + 1 < len(runs) and _joinable(text[runs[i][1] : runs[i + 1][0]]):
            i += 1
        digits_start, end = runs[first][0], runs[i][1]
        start = digits_start
        lead = ""
        if digits_start and text[digits_start - 1] in "+(":  # most candidates have no lead: skip the search
            for option in ("(+", "+(", "+", "("):
                if text[max(0, digits_start - len(option)) : digits_start] == option:
                    lead, start = option, digits_start - len(option)
                    break
        # A closing bracket belongs to the candidate when it closes one it opened.
        body = text[start:end]
        if end < len(text) and text[end] == ")" and body.count("(") > body.count(")"):
            end += 1
        groups = tuple(text[a:b] for a, b in runs[first : i + 1])
        explicit = "+" in lead or groups[0].startswith("00")
        spans.append(_Span(start, end, digits_start, groups, lead, explicit))
        i += 1
    return spans


# ------------------------------------------------------------------------------------------------- context
_CURRENCY_BEFORE = re.compile(r"(?:[$€£¥￥]|hk\$|s\$|hkd|sgd|mop|usd|rmb)\s*$")
_HASH_BEFORE = re.compile(r"#\s*$")
_CURRENCY_AFTER = re.compile(r"^\s*(?:%|元|蚊|dollars?(?![a-z]))")
_LABELS = {"whatsapp", "wa", "tel", "ph", "phone", "mobile", "mob", "hp", "cell", "no", "num", "number"}
_EXTENSION_AFTER = re.compile(r"^(?:x|ext)\.?\s*[0-9]")
_KEYWORD_BEFORE = re.compile(
    r"(?<![a-z])(?:order|ref|invoice|booking|tracking|otp|code|id|account)(?![a-z])"
    r"|訂單|订单|單號|单号|編號|编号|會員|会员|驗證碼|验证码"
)
_KEYWORD_REACH = 16  # characters before a candidate in which a reference keyword rejects it
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def _glued_word_before(text: str, start: int) -> str | None:
    if start == 0 or not _ASCII_LETTER.match(text[start - 1]):
        return None
    i = start
    while i > 0 and _ASCII_LETTER.match(text[i - 1]):
        i -= 1
    return text[i:start]


def _glued_word_after(text: str, end: int) -> str | None:
    if end >= len(text) or not _ASCII_LETTER.match(text[end]):
        return None
    i = end
    while i < len(text) and _ASCII_LETTER.match(text[i]):
        i += 1
    return text[end:i]


def _context_reason(text: str, span: _Span, previous_end: int) -> str | None:
    lower = text.lower()
    before = lower[: span.start]
    after = lower[span.end :]
    if _CURRENCY_BEFORE.search(before) or _CURRENCY_AFTER.match(after):
        return "looks like money"
    if _HASH_BEFORE.search(before):
        return "looks like an id (after '#')"
    word = _glued_word_before(text, span.start)
    if word is not None and word.lower() not in _LABELS:
        return f"glued to the letters {word!r}"
    word = _glued_word_after(text, span.end)
    if word is not None and not _EXTENSION_AFTER.match(after):
        return f"glued to the letters {word!r}"
    window = lower[max(previous_end, span.start - _KEYWORD_REACH) : span.start]
    keyword = _KEYWORD_BEFORE.search(window)
    if keyword:
        return f"looks like a reference (after {keyword.group(0)!r})"
    return None


# ------------------------------------------------------------------------------------------ shape and region
_BARE_CODE_DIGITS = 4  # a "+" or "00" with at most this many digits and nothing else is a bare country code
# A bare country code claims every later candidate of the reply that has no country code of its own,
# whatever stands between ("+44 (UK) 9123 4567"): read in the default region, those digits would become
# another country's number, and a wrong number stored is worse than none.


@lru_cache(maxsize=32)
def _country_code(region: str) -> str:
    import phonenumbers

    code = phonenumbers.country_code_for_region(region.upper())
    if not code:
        raise UsageError(f"unknown region {region!r}: expected an ISO code such as HK, MO or SG")
    return str(code)


def check_rule(rule: WhatsAppRule) -> WhatsAppRule:
    """Reject a rule whose regions phonenumbers does not know (a clear error instead of a silent miss)."""
    for region in (rule.default_region, *rule.accepted_regions):
        _country_code(region)
    if rule.validation not in ("strict", "off"):
        raise UsageError(f"invalid validation mode {rule.validation!r}: expected strict or off")
    try:
        _compiled_extra(rule.extra_prompt_patterns)
    except re.error as exc:
        raise UsageError(f"invalid prompt pattern: {exc}") from None
    return rule


def _explicit_groups(span: _Span) -> list[str]:
    """The digit groups of an explicit candidate after its ``00`` (empty when there is nothing after it)."""
    groups = list(span.groups)
    if groups[0].startswith("00"):
        groups[0] = groups[0][2:]
        if not groups[0]:
            groups.pop(0)
    return groups


def _bare_country_code(span: _Span) -> str | None:
    """The code of a candidate that is nothing but an explicit country code (``+65``, ``0044``), else None."""
    if not span.explicit or span.digit_count > _BARE_CODE_DIGITS + 2:
        return None
    digits = "".join(_explicit_groups(span))
    return digits if 1 <= len(digits) <= _BARE_CODE_DIGITS else None


def _shape(span: _Span, rule: WhatsAppRule) -> tuple[str, str] | str:
    """Return (country code, 8 national digits), or the reason the candidate's shape is rejected."""
    explicit = span.explicit
    groups = _explicit_groups(span) if explicit else list(span.groups)
    if not groups:
        return "no digits after 00"
    digits = "".join(groups)
    sizes = [len(g) for g in groups]
    for region in rule.accepted_regions:
        cc = _country_code(region)
        if digits.startswith(cc) and len(digits) == len(cc) + 8:
            n = len(cc)
            if sizes in ([n, 8], [n, 4, 4], [n + 8], [n + 4, 4]):
                return cc, digits[n:]
            return f"country code {cc} with digits grouped as {'-'.join(map(str, sizes))}"
    if explicit:
        for region in rule.accepted_regions:
            if digits.startswith(_country_code(region)):
                return f"wrong length for +{_country_code(region)} ({len(digits)} digits)"
        return "foreign country code"
    if len(digits) != 8:
        return f"{len(digits)} digits, not 8"
    if sizes not in ([8], [4, 4]):
        return f"8 digits grouped as {'-'.join(map(str, sizes))}"
    return _country_code(rule.default_region), digits


@lru_cache(maxsize=4096)
def _validate(cc: str, national: str, validation: str) -> str | None:
    """Return the reason a well-shaped number is refused, or None when it is a plausible mobile.

    The number is built from its parts rather than parsed from text: the rule has already decided the
    country code, and parsing costs more than the check. For a country code of one region,
    ``is_valid_number`` is exactly "``number_type`` is not UNKNOWN", so one call answers both questions.
    """
    if validation == "off":
        allowed = FIRST_DIGITS.get(cc, "123456789")
        return None if national[0] in allowed else f"+{cc} numbers do not start with {national[0]}"
    import phonenumbers
    from phonenumbers import PhoneNumberType

    number = phonenumbers.PhoneNumber(country_code=int(cc), national_number=int(national))
    if len(phonenumbers.region_codes_for_country_code(int(cc))) == 1:
        kind = phonenumbers.number_type(number)
        valid = kind != PhoneNumberType.UNKNOWN
    else:
        valid = phonenumbers.is_valid_number(number)
        kind = phonenumbers.number_type(number)
    if not valid:
        return f"+{cc} {national} is not a valid number"
    if kind not in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE):
        return f"+{cc} {national} is not a mobile number"
    return None


# --------------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Candidate:
    """One candidate of a reply: its original text, and the number it gave or why it was rejected."""

    text: str
    start: int
    end: int
    e164: str | None
    reason: str | None


@dataclass(frozen=True)
class ReplyResult:
    candidates: tuple[Candidate, ...]

    @property
    def numbers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.e164 for c in self.candidates if c.e164))

    @property
    def outcome(self) -> str:
        found = len(self.numbers)
        return CAPTURED if found == 1 else AMBIGUOUS if found > 1 else NOT_FOUND

    @property
    def number(self) -> str | None:
        numbers = self.numbers
        return numbers[0] if len(numbers) == 1 else None

    @property
    def matched(self) -> str | None:
        """The original text of the captured candidate."""
        number = self.number
        return next((c.text for c in self.candidates if c.e164 == number), None) if number else None

    @property
    def reasons(self) -> list[str]:
        return [f"{c.text}: {c.reason}" for c in self.candidates if c.reason]


def extract_reply(reply: str, rule: WhatsAppRule | None = None) -> ReplyResult:
    """Cut a reply into candidates and judge each: the number it gives (E.164) or why it gives none."""
    rule = rule or WhatsAppRule()
    norm = normalize_text(reply)
    text = norm.text
    out: list[Candidate] = []
    previous_end = 0
    previous: _Span | None = None
    code_before: str | None = None  # a country code written on its own earlier in the reply
    for span in _cut(text):
        original = norm.original_span(span.start, span.end)
        start = norm.origin[span.start]
        end = norm.origin[span.end - 1] + 1
        reason: str | None
        e164: str | None = None
        if previous is not None and _EXTENSION_AFTER.match(
            text[previous.end : span.digits_start + 1].lower()
        ):
            reason = "extension"
        elif code_before is not None and not span.explicit:
            # "+65 / 9123 4567", "+44 (UK) 9123 4567": these digits go with that country code, whatever
            # stands between; read in the default region they would become another country's number.
            reason = f"belongs to the country code +{code_before} before it"
        else:
            reason = _context_reason(text, span, previous_end)
            if reason is None:
                shape = _shape(span, rule)
                if isinstance(shape, str):
                    reason = shape
                else:
                    cc, national = shape
                    reason = _validate(cc, national, rule.validation)
                    if reason is None:
                        e164 = f"+{cc}{national}"
        out.append(Candidate(original, start, end, e164, reason))
        previous_end = span.end
        previous = span
        if span.explicit:  # a candidate with a country code of its own ends what the earlier one claimed
            code_before = _bare_country_code(span)
    return ReplyResult(tuple(out))


def normalize_number(text: str, rule: WhatsAppRule | None = None) -> str:
    """Read one WhatsApp number typed by a person or a form, by the extraction rule; E.164 or InvalidNumber."""
    rule = rule or WhatsAppRule()
    result = extract_reply(text, rule)
    numbers = result.numbers
    codes = tuple(_country_code(region) for region in rule.accepted_regions)
    if len(numbers) == 1:
        return numbers[0]
    if len(numbers) > 1:
        raise InvalidNumber(text, "more than one number", codes)
    reasons = [c.reason for c in result.candidates if c.reason]
    raise InvalidNumber(text, reasons[0] if len(reasons) == 1 else "", codes)


_TYPED_INTERNATIONAL = re.compile(r"\+[0-9][0-9 .\-()]{5,24}")


def lookup_number(text: str, rule: WhatsAppRule | None = None) -> str:
    """The E.164 number to look conversations up by: what :func:`normalize_number` reads, or else any
    number written with ``+`` and its country code (``+60 12-351 1338``), as a WhatsApp sender's number from
    any country is stored. Only finds; never stores. Raises InvalidNumber as :func:`normalize_number`."""
    try:
        return normalize_number(text, rule)
    except InvalidNumber:
        stripped = text.strip()
        if _TYPED_INTERNATIONAL.fullmatch(stripped):
            number = channel_number("+" + re.sub(r"[^0-9]", "", stripped))
            if number is not None:
                return number
        raise


def form_number(value: object, rule: WhatsAppRule | None = None) -> str | None:
    """A phone a form or a lead carries (``form_submission.phone``, a lead's ``customerPhone``), read by the
    same rule as a number typed by a person; None when it is empty or not a number the rule accepts."""
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        return None
    try:
        return normalize_number(str(value), rule)
    except InvalidNumber:
        return None


# A WhatsApp sender id: the international number in digits, ``+`` optional (``85291234567``, ``+447700900123``).
_SENDER_ID = re.compile(r"\+?[1-9][0-9]{6,14}")
# Without ``+``, this many digits or fewer may be a local number of Hong Kong, Macau or Singapore
# (``85212345`` is both Hong Kong's 8521 2345 and "+852 12345"): too ambiguous to store.
_LOCAL_DIGITS = 8


def channel_number(value: object) -> str | None:
    """The E.164 number of a WhatsApp sender id, from any country; None for anything else.

    Accepted, exactly: ASCII digits, optionally led by ``+`` (spaces around the whole are ignored), 7 to
    15 digits, a country code ``phonenumbers`` knows and a length that is possible for that country
    (``is_possible_number``, local-only lengths excluded); without ``+``, more than 8 digits. Anything else
    (spaces or dashes inside, a leading ``00``, a name, an email, an account id) is not a sender's number:
    a wrong number stored is worse than none.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not _SENDER_ID.fullmatch(text):
        return None
    digits = text.removeprefix("+")
    if not text.startswith("+") and len(digits) <= _LOCAL_DIGITS:
        return None
    import phonenumbers

    try:
        parsed = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number_with_reason(parsed) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# Where a conversation's number comes from. A person's value (``manual``) beats every other source and is
# never replaced by one; of the others the first that gave a number is stored (docs/whatsapp.md).
MANUAL = "manual"
AUTO_SOURCES = ("extracted", "channel", "lead", "form")
NUMBER_SOURCES = (MANUAL, *AUTO_SOURCES)


def number_in_force(
    *, extracted: str | None, channel: str | None, lead: str | None, form: str | None
) -> tuple[str | None, str | None]:
    """The number the rule stores and its source, by precedence: the chat reply (``extracted``) > the
    WhatsApp sender's own number (``channel``) > a lead form (``lead``) > ``form_submission.phone``
    (``form``); ``(None, None)`` when none gave one. A manual number is the caller's to keep."""
    for source, number in zip(AUTO_SOURCES, (extracted, channel, lead, form), strict=True):
        if number:
            return number, source
    return None, None


def region_of(e164: str) -> str | None:
    """The ISO region of a stored number (for the report's phone regions)."""
    import phonenumbers

    known = phonenumbers.COUNTRY_CODE_TO_REGION_CODE
    for length in (1, 2, 3):  # country codes are prefix-free: at most one prefix is a code
        prefix = e164[1 : 1 + length]
        if prefix.isdigit() and int(prefix) in known:
            regions = known[int(prefix)]
            if len(regions) == 1 and regions[0] != "001":
                return str(regions[0])
            break
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return None


# ------------------------------------------------------------------------------------------- conversations
ASSISTANT_ROLES = frozenset({"assistant", "bot", "ai", "chatbot"})
USER_ROLES = frozenset({"user", "human", "customer"})


@dataclass(frozen=True)
class Extraction:
    """What the rule found in one conversation."""

    outcome: str
    number: str | None = None
    matched: str | None = None
    reasons: list[str] = field(default_factory=list)
    prompt_index: int | None = None
    reply_index: int | None = None


def extract_conversation(messages: Sequence[tuple[str, str]], rule: WhatsAppRule | None = None) -> Extraction:
    """Apply the rule to a conversation given as (role, content) pairs in order."""
    rule = rule or WhatsAppRule()
    prompt_index = None
    assistants_seen = 0
    for index, (role, content) in enumerate(messages):
        if role not in ASSISTANT_ROLES:
            continue
        assistants_seen += 1
        if assistants_seen > rule.prompt_window:
            break
        if is_prompt(content, rule):
            prompt_index = index
            break
    if prompt_index is None:
        return Extraction(NO_PROMPT)
    reply_index = next(
        (i for i in range(prompt_index + 1, len(messages)) if messages[i][0] in USER_ROLES), None
    )
    if reply_index is None:
        return Extraction(NO_REPLY, prompt_index=prompt_index)
    result = extract_reply(messages[reply_index][1], rule)
    return Extraction(
        result.outcome, result.number, result.matched, result.reasons, prompt_index, reply_index
    )


def iter_roles_and_contents(messages: Iterable[dict[str, object]]) -> list[tuple[str, str]]:
    """(role, content) pairs from stored messages, tolerant of odd roles and non-string content."""
    pairs = []
    for m in messages:
        role = str(m.get("role") or "").lower()
        content = m.get("content")
        pairs.append((role, content if isinstance(content, str) else ""))
    return pairs
