"""Deterministic, realistic Chatbase conversations for the emulator.

Conversation ``i`` of a chatbot is a pure function of (seed, chatbot, i), and creation times grow with
``i``, so a date range maps to an index range by bisection: the emulator serves millions of conversations
without holding them. Each conversation also carries the ground truth chatsync must find (the planted
WhatsApp number and where it came from), written down by the generator rather than by the extractor.

The v1 record and the v2 export record of conversation ``i`` are two views of one conversation: the same
id, creation time, message texts and message times. What only v2 has (status, feedback, tool calls, the
sender's ``userId``) comes from a separate random stream, so v1 data is the same with or without v2.
Leads (lead forms filled in during a conversation) are derived the same way.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

SOURCES = [("WhatsApp", 55), ("Widget or Iframe", 33), ("API", 6), ("Playground", 3), (None, 3)]
COUNTRIES = [("HK", 60), ("SG", 15), ("MO", 5), ("TW", 4), ("GB", 4), ("US", 4), (None, 8)]

PROMPTS = [
    "Hi! Before we start, may I have your WhatsApp number?",
    "請提供您的 WhatsApp 號碼，方便我們聯絡您。",
    "请留下你的WhatsApp电话号码",
    "你的 WhatsApp 電話係幾多？",
    "What's your Whatsapp no.?",
    "¿Cuál es tu número de WhatsApp?",
    "Boleh berikan nombor WhatsApp anda?",
    "Welcome to Harbour Dental! Could you share your WhatsApp number so we can confirm your booking?",
]
GREETINGS = [
    "Hello! How can I help you today?",
    "您好！有什麼可以幫到您？",
    "Hi there 👋 What can I do for you?",
]
QUESTIONS = [
    ("What are your opening hours?", "We are open 9am to 7pm, Monday to Saturday."),
    ("How much is a cleaning?", "A standard cleaning is HK$680, including a check-up."),
    ("你們在哪裡？", "我們在中環皇后大道中 88 號 12 樓。"),
    ("Do you accept insurance?", "Yes, we accept most major insurance plans. Which one do you have?"),
    ("Can I book for Saturday?", "Saturday 10:30 and 15:00 are free. Which suits you?"),
    ("有冇停車場？", "大廈有收費停車場，每小時 HK$40。"),
    ("Is parking available?", "There is a paid car park in the building."),
    ("Thanks!", "You're welcome! Anything else?"),
    ("How long does whitening take?", "About 90 minutes in one visit."),
    ("¿Hablan español?", "Sí, uno de nuestros dentistas habla español."),
]
CLOSERS = ["Is there anything else I can help with?", "Have a nice day!", "Would you like me to book it?"]
REFUSALS = ["I'd rather not say", "why do you need it?", "no whatsapp sorry", "later", "email me instead"]
# Replies holding a number the rule must accept; {a} and {b} are the halves of the national number.
NUMBER_FORMATS_LOCAL = [
    "{a} {b}",
    "{a}{b}",
    "{a}-{b}",
    "my number is {a} {b}",
    "我的電話是 {a} {b}",
    "WhatsApp: {a}.{b}",
    "sure, {a}{b} thanks",
    "call me at {a} {b} please",
]
NUMBER_FORMATS_CC = ["+{cc} {a} {b}", "{cc}-{a}{b}", "({cc}) {a} {b}", "00{cc} {a} {b}", "+{cc}{a}{b}"]
# Replies holding digits that must not be stored.
NON_NUMBERS = [
    "order 12345678901",
    "{a} {b}5",
    "{a[0]}{a[1]} {a[2]}{a[3]} {b}",
    "HK${a}{b}",
    "2024-01-05",
    "OTP 912345",
]

# v2 only: conversation status, thumbs on answers, tools an answer called (name and sanitised output)
STATUSES = [("ended", 60), ("ongoing", 20), ("taken_over", 12), ("paused", 8)]
FEEDBACK = [(None, 84), ("positive", 11), ("negative", 5)]
TOOLS: dict[str, tuple[str, Any]] = {
    "We are open 9am to 7pm, Monday to Saturday.": ("get_opening_hours", {"open": "09:00", "close": "19:00"}),
    "A standard cleaning is HK$680, including a check-up.": (
        "lookup_price",
        {"item": "cleaning", "hkd": 680},
    ),
    "Saturday 10:30 and 15:00 are free. Which suits you?": (
        "check_availability",
        {"slots": ["10:30", "15:00"]},
    ),
}
DEFAULT_TOOL: tuple[str, Any] = ("search_knowledge_base", {"matches": 2})
# WhatsApp senders from elsewhere: (country code, leading digits, national length)
FOREIGN_MOBILES = [("44", "7", 10), ("1", "415", 10), ("91", "98", 10), ("60", "12", 9), ("61", "4", 9)]
LEAD_SALT = 0x1EAD_F0E5


@dataclass(frozen=True)
class Planted:
    """What the rule should store for a conversation: the number and its source, or nothing."""

    number: str | None
    source: str | None  # "extracted" | "form" | None


@lru_cache(maxsize=8192)
def _valid_mobile(cc: str, national: str) -> bool:
    import phonenumbers

    parsed = phonenumbers.parse(f"+{cc}{national}", None)
    return phonenumbers.is_valid_number(parsed) and phonenumbers.number_type(parsed) in (
        phonenumbers.PhoneNumberType.MOBILE,
        phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
    )


def _mobile(rng: random.Random, cc: str | None = None) -> tuple[str, str]:
    cc = cc or rng.choices(["852", "65", "853"], weights=[85, 10, 5])[0]
    first = {"852": "569", "65": "89", "853": "6"}[cc]
    while True:
        national = rng.choice(first) + f"{rng.randrange(10**7):07d}"
        if _valid_mobile(cc, national):
            return cc, national


def _weighted(rng: random.Random, table: list[tuple[Any, int]]) -> Any:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


class Dataset:
    """The conversations of one chatbot: ``count`` of them spread evenly over ``days`` before ``end``."""

    def __init__(
        self,
        chatbot_id: str,
        count: int,
        seed: int,
        end: datetime,
        days: float,
        *,
        channel_customer: bool = False,
    ) -> None:
        self.chatbot_id = chatbot_id
        self.channel_customer = channel_customer  # v1 ``customer`` carries the WhatsApp sender's number
        self.count = count
        self.seed = seed
        self.end = end
        self.days = days
        digest = hashlib.sha256(f"{seed}:{chatbot_id}".encode()).digest()
        self._prefix = int.from_bytes(digest[:8], "big")
        self._span = timedelta(days=days).total_seconds()
        self._start = end.timestamp() - self._span
        self._leads: list[Lead] | None = None
        self._sources: list[str | None] | None = None

    # ----------------------------------------------------------------------------------------- identity
    def conversation_id(self, index: int) -> str:
        return str(uuid.UUID(int=(self._prefix << 64) | index))

    def index_of(self, conversation_id: str) -> int | None:
        try:
            value = uuid.UUID(conversation_id).int
        except ValueError:
            return None
        index = value & ((1 << 64) - 1)
        if value >> 64 != self._prefix or index >= self.count:
            return None
        return index

    # --------------------------------------------------------------------------------------------- time
    def created_ts(self, index: int) -> float:
        """Creation time (epoch seconds), strictly increasing with the index."""
        slot = self._span / max(self.count, 1)
        jitter = (hash((self.seed, index)) % 1000) / 1000 * 0.9 * slot
        return self._start + index * slot + jitter

    def created_iso(self, index: int) -> str:
        """Creation time as v1 sends it: ISO 8601 with milliseconds and ``Z``."""
        return _iso(self.created_ts(index))

    def export_created_at(self, index: int) -> float:
        """Creation time as the v2 export sends it: epoch seconds, the same millisecond as v1's string."""
        return _epoch(self.created_iso(index))

    def sources(self) -> list[str | None]:
        """Every conversation's source, by index (computed once: source filters walk it)."""
        if self._sources is None:
            # the source is the first draw of a conversation's random stream (see _generate)
            self._sources = [
                _weighted(random.Random(self._prefix ^ (i * 0x9E3779B97F4A7C15)), SOURCES)
                for i in range(self.count)
            ]
        return self._sources

    def first_index_at_or_after(self, ts: float) -> int:
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.created_ts(mid) < ts:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------------------------- conversation
    def conversation(self, index: int) -> tuple[dict[str, Any], Planted]:
        """Conversation ``index`` as Chatbase v1 sends it, with the ground truth planted in it."""
        generated = self._generate(index)
        raw = generated.raw
        if self.channel_customer and raw["source"] == "WhatsApp":
            user_id, channel = self._sender(index, raw["source"], generated.planted)
            if channel:
                raw["customer"] = user_id  # the v1 "customer" string carries the sender's number
        return raw, generated.planted

    def _generate(self, index: int) -> _Generated:
        """The v1 record and what the v2 export is built from (message kinds and every message's time)."""
        rng = random.Random(self._prefix ^ (index * 0x9E3779B97F4A7C15))
        created = self.created_ts(index)
        source = _weighted(rng, SOURCES)
        stamp_style = rng.choices(["createdAt", "created_at", None], weights=[50, 25, 25])[0]
        msgs: list[tuple[str, str, str]] = []  # role, content, kind
        planted_number: str | None = None
        left = False

        if rng.random() < 0.25:
            msgs.append(("assistant", rng.choice(GREETINGS), "greeting"))
            if rng.random() < 0.5:
                msgs.append(("user", "hi", "chat"))
        if rng.random() < 0.88:
            msgs.append(("assistant", rng.choice(PROMPTS), "prompt"))
            roll = rng.random()
            if roll < 0.08:
                left = True  # the user leaves without answering
            elif roll < 0.70:
                cc, national = _mobile(rng)
                a, b = national[:4], national[4:]
                if cc == "852" and rng.random() < 0.8:
                    reply = rng.choice(NUMBER_FORMATS_LOCAL).format(a=a, b=b)
                else:
                    reply = rng.choice(NUMBER_FORMATS_CC).format(cc=cc, a=a, b=b)
                msgs.append(("user", reply, "reply"))
                planted_number = f"+{cc}{national}"
            elif roll < 0.78:
                _, first = _mobile(rng, "852")
                _, second = _mobile(rng, "852")
                msgs.append(("user", f"{first[:4]} {first[4:]} or {second[:4]} {second[4:]}", "reply"))
            elif roll < 0.88:
                _, national = _mobile(rng)
                msgs.append(("user", rng.choice(NON_NUMBERS).format(a=national[:4], b=national[4:]), "reply"))
            else:
                msgs.append(("user", rng.choice(REFUSALS), "reply"))
        for _ in range(0 if left else rng.choice([0, 1, 2, 2, 3, 3, 4, 6])):
            question, answer = rng.choice(QUESTIONS)
            msgs.append(("user", question, "question"))
            msgs.append(("assistant", answer, "answer"))
        if not left and rng.random() < 0.3:
            msgs.append(("assistant", rng.choice(CLOSERS), "closer"))

        messages: list[dict[str, Any]] = []
        times: list[str] = []
        moment = created
        for position, (role, content, _kind) in enumerate(msgs):
            moment += rng.uniform(1.0, 6.0) if role == "assistant" else rng.uniform(4.0, 90.0)
            message: dict[str, Any] = {"role": role, "content": content, "type": "text"}
            if role == "user":
                message["id"] = f"msg_{index:x}_{position}"
            else:
                message["score"] = round(rng.uniform(0.4, 1.0), 3)
            times.append(_iso(moment))
            if stamp_style:
                message[stamp_style] = times[-1]
            messages.append(message)

        raw: dict[str, Any] = {
            "id": self.conversation_id(index),
            "created_at": _iso(created),
            "chatbot_id": self.chatbot_id,
            "source": source,
            "messages": messages,
        }
        raw["last_message_at" if rng.random() < 0.7 else "updated_at"] = _iso(moment)
        customer_style = rng.random()
        if customer_style < 0.35:
            raw["customer"] = f"cust_{rng.randrange(10**6):06d}"
        elif customer_style < 0.55:
            person = {"name": rng.choice(["Alex Chan", "Mei Ling", "Sam Tan", "Jo Wong"])}
            if rng.random() < 0.6:
                person["email"] = f"user{rng.randrange(10**5)}@example.com"
            raw["customer"] = person
        country = _weighted(rng, COUNTRIES)
        if country:
            raw["country"] = country
        raw["min_score"] = round(rng.uniform(0.3, 0.95), 3)

        planted = Planted(planted_number, "extracted" if planted_number else None)
        if source == "WhatsApp" and rng.random() < 0.3:
            cc, national = _mobile(rng)
            phone = rng.choice([f"{cc}{national}", f"+{cc} {national[:4]} {national[4:]}"])
            raw["form_submission"] = {"name": "WhatsApp user", "phone": phone}
            if planted_number is None:
                planted = Planted(f"+{cc}{national}", "form")
        return _Generated(raw, planted, [kind for _, _, kind in msgs], times, _iso(moment))

    # ---------------------------------------------------------------------------------- v2 export
    def _sender(self, index: int, source: str | None, planted: Planted) -> tuple[str | None, str | None]:
        """The v2 ``userId`` and, when it is a WhatsApp sender's phone number, that number in E.164.

        WhatsApp conversations mostly carry the sender's number, written ``85291234567`` or ``+6581234567``
        and from any country; other sources carry an account id or nothing, and now and then a
        phone-shaped id that is not a WhatsApp sender (no channel number: the source is not WhatsApp).
        """
        rng = random.Random(f"sender/{self.seed}/{self.chatbot_id}/{index}")
        roll = rng.random()
        if source == "WhatsApp":
            if roll < 0.75:
                if planted.number and rng.random() < 0.5:
                    number = planted.number  # the number typed in the chat is often the sender's own
                elif rng.random() < 0.7:
                    cc, national = _mobile(rng)
                    number = f"+{cc}{national}"
                else:
                    number = _foreign_mobile(rng)
                user_id = number if rng.random() < 0.4 else number.removeprefix("+")
                return user_id, number
            if roll < 0.85:
                return f"user_{rng.randrange(16**8):08x}", None
            return None, None
        if roll < 0.25:
            return f"user_{rng.randrange(16**8):08x}", None
        if roll < 0.30:
            cc, national = _mobile(rng)
            return f"{cc}{national}", None
        return None, None

    def export_record(self, index: int) -> tuple[dict[str, Any], ExportTruth]:
        """Conversation ``index`` as the v2 export sends it (the v1 conversation's id, times and texts),
        with the v2 facts a test recomputes figures from."""
        generated = self._generate(index)
        raw = generated.raw
        rng = random.Random(f"v2/{self.seed}/{self.chatbot_id}/{index}")
        source = raw["source"]
        user_id, channel = self._sender(index, source, generated.planted)
        status = _weighted(rng, STATUSES)
        messages: list[dict[str, Any]] = []
        times: list[float | None] = []
        feedback: list[str | None] = []
        tool_calls = 0
        for position, (message, kind, at) in enumerate(
            zip(raw["messages"], generated.kinds, generated.times, strict=True)
        ):
            role = message["role"]
            parts: list[dict[str, Any]] = []
            if kind == "answer" and rng.random() < 0.2:
                tool_calls += 1
                name, output = TOOLS.get(message["content"], DEFAULT_TOOL)
                call_id = f"call_{index:x}_{position}"
                parts.append({"type": "tool-call", "toolCallId": call_id, "toolName": name})
                parts.append(
                    {"type": "tool-result", "toolCallId": call_id, "toolName": name, "output": output}
                )
            parts.append({"type": "text", "text": message["content"]})
            out: dict[str, Any] = {"id": message.get("id") or f"msg_{index:x}_{position}", "role": role}
            out["parts"] = parts
            created = _epoch(at) if rng.random() >= 0.01 else None  # a few messages come without a time
            if created is not None:
                out["createdAt"] = created
            times.append(created)
            rating = None
            if role == "assistant":
                rating = _weighted(rng, FEEDBACK)
                out["feedback"] = rating
                out["metadata"] = {"score": message["score"]}
            feedback.append(rating)
            messages.append(out)
        first_question = next(
            (
                m["content"]
                for m, kind in zip(raw["messages"], generated.kinds, strict=True)
                if kind == "question"
            ),
            None,
        )
        record: dict[str, Any] = {
            "id": raw["id"],
            "title": first_question[:60] if first_question and rng.random() < 0.8 else None,
            "createdAt": _epoch(raw["created_at"]),
            "updatedAt": _epoch(generated.last),
            "userId": user_id,
            "source": source,
            "status": status,
            "messages": messages,
        }
        truth = ExportTruth(
            id=raw["id"],
            created_at=record["createdAt"],
            updated_at=record["updatedAt"],
            source=source,
            status=status,
            user_id=user_id,
            channel_number=channel,
            roles=tuple(m["role"] for m in messages),
            texts=tuple(m["content"] for m in raw["messages"]),
            message_times=tuple(times),
            feedback=tuple(feedback),
            tool_calls=tool_calls,
        )
        return record, truth

    # -------------------------------------------------------------------------------------------- leads
    def lead(self, index: int) -> Lead | None:
        """The lead form submitted in conversation ``index``, if its user filled one in."""
        rng = random.Random(f"lead/{self.seed}/{self.chatbot_id}/{index}")
        if rng.random() >= 0.2:
            return None
        _, planted = self.conversation(index)
        name = rng.choice(["Alex Chan", "Mei Ling", "Sam Tan", "Jo Wong", "Priya Nair", "Tom Lee"])
        email = f"{name.split()[0].lower()}{rng.randrange(10**4)}@example.com" if rng.random() < 0.8 else ""
        roll = rng.random()
        number: str | None
        if roll < 0.45 and planted.number:
            number = planted.number
        elif roll < 0.8:
            cc, national = _mobile(rng)
            number = f"+{cc}{national}"
        else:
            number = None
        if number is None:
            phone = rng.choice(["", "n/a"])
        else:
            styles = [number, number.removeprefix("+")]
            if number.startswith("+852"):
                styles.append(f"{number[4:8]} {number[8:]}")  # typed the local way, no country code
            phone = rng.choice(styles)
        created = min(self.created_ts(index) + rng.uniform(20, 900), self.end.timestamp())
        return Lead(
            id=str(uuid.UUID(int=((self._prefix ^ LEAD_SALT) << 64) | index)),
            chatbot_id=self.chatbot_id,
            conversation_id=self.conversation_id(index),
            name=name,
            email=email,
            phone=phone,
            created_at=datetime.fromtimestamp(int(created), UTC).isoformat().replace("+00:00", "Z"),
            number=number,
            matches_conversation=number is not None and number == planted.number,
        )

    def leads(self) -> list[Lead]:
        """Every lead of this chatbot, oldest first (computed once)."""
        if self._leads is None:
            found = (self.lead(i) for i in range(self.count))
            self._leads = sorted((x for x in found if x), key=lambda x: (x.created_at, x.id))
        return self._leads


@dataclass(frozen=True)
class _Generated:
    raw: dict[str, Any]
    planted: Planted
    kinds: list[str]  # what each message is: greeting, prompt, reply, question, answer, closer, chat
    times: list[str]  # every message's moment (ISO), whether or not the v1 record shows it
    last: str


@dataclass(frozen=True)
class ExportTruth:
    """The facts of one v2 export record, written down by the generator (the figures' ground truth)."""

    id: str
    created_at: float  # epoch seconds, as exported
    updated_at: float
    source: str | None
    status: str  # ongoing | ended | taken_over | paused
    user_id: str | None
    channel_number: str | None  # E.164 when ``user_id`` is the WhatsApp sender's number, else None
    roles: tuple[str, ...]
    texts: tuple[str, ...]  # each message's text, as v1 sends it in ``content``
    message_times: tuple[float | None, ...]  # each message's ``createdAt``; None where the export omits it
    feedback: tuple[str | None, ...]  # "positive" | "negative" | None per message (None for user messages)
    tool_calls: int  # assistant messages that carry a tool-call and a tool-result part

    @property
    def positive(self) -> int:
        return self.feedback.count("positive")

    @property
    def negative(self) -> int:
        return self.feedback.count("negative")


@dataclass(frozen=True)
class Lead:
    """A lead form as ``get-leads`` and the ``leads.submit`` webhook report it, and what it should yield."""

    id: str
    chatbot_id: str
    conversation_id: str  # only the webhook carries it; get-leads rows have no conversation id
    name: str
    email: str
    phone: str  # as the user typed it; may be empty or not a number
    created_at: str  # ISO 8601, seconds
    number: str | None  # E.164 of ``phone`` (an 8-digit number without country code is Hong Kong's)
    matches_conversation: bool  # the same number the conversation's chat or form gave


def _epoch(iso: str) -> float:
    """Epoch seconds of an ISO time with milliseconds: the v2 number for the same instant as v1's string."""
    return round(datetime.fromisoformat(iso).timestamp(), 3)


def _foreign_mobile(rng: random.Random) -> str:
    """A valid mobile number from outside Hong Kong, Macau and Singapore, in E.164."""
    import phonenumbers

    cc, lead, length = rng.choice(FOREIGN_MOBILES)
    while True:
        national = lead + "".join(rng.choice("0123456789") for _ in range(length - len(lead)))
        if phonenumbers.is_valid_number(phonenumbers.parse(f"+{cc}{national}", None)):
            return f"+{cc}{national}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


BAD_RECORD_KINDS = (
    "no id",
    "messages not a list",
    "message not an object",
    "huge message",
    "unparsable date",
)
# Text no database can hold, as JavaScript and broken clients produce it: chatsync stores these
# conversations with U+FFFD in place of the offending characters.
DAMAGED_TEXT_KINDS = ("half an emoji", "NUL character")


def spoil(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """Turn a good conversation into one of the bad records Chatbase has been seen to send."""
    bad = dict(raw)
    if kind == "no id":
        bad.pop("id")
    elif kind == "messages not a list":
        bad["messages"] = {"role": "user", "content": "hi"}
    elif kind == "message not an object":
        bad["messages"] = [*raw["messages"], "hi"]
    elif kind == "huge message":
        bad["messages"] = [*raw["messages"], {"role": "user", "content": "x" * 1_048_576}]
    elif kind == "unparsable date":
        bad["created_at"] = "yesterday-ish"
    return bad


def damage(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """Append a user message whose text no database can hold: a lone UTF-16 surrogate (JavaScript cuts
    an emoji in half: ``"thanks \\ud83d"``) or a NUL character."""
    text = "thanks \ud83d" if kind == "half an emoji" else "bad\x00byte"
    return {**raw, "messages": [*raw["messages"], {"role": "user", "content": text}]}


def damage_export(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """:func:`damage` in the v2 export's shape."""
    text = "thanks \ud83d" if kind == "half an emoji" else "bad\x00byte"
    return {**record, "messages": [*record["messages"], _text_message("damaged", "user", text)]}


def spoil_export(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The same bad records as :func:`spoil`, in the v2 export's shape."""
    bad = dict(record)
    if kind == "no id":
        bad.pop("id")
    elif kind == "messages not a list":
        bad["messages"] = {"role": "user", "parts": [{"type": "text", "text": "hi"}]}
    elif kind == "message not an object":
        bad["messages"] = [*record["messages"], "hi"]
    elif kind == "huge message":
        bad["messages"] = [*record["messages"], _text_message("bad-huge", "user", "x" * 1_048_576)]
    elif kind == "unparsable date":
        bad["createdAt"] = "yesterday-ish"
    return bad


def _text_message(message_id: str, role: str, text: str) -> dict[str, Any]:
    return {"id": message_id, "role": role, "parts": [{"type": "text", "text": text}]}


def export_message(message: dict[str, Any], message_id: str) -> dict[str, Any]:
    """A v1-shaped message (``role``, ``content``, ISO ``createdAt``) as the v2 export sends it."""
    out = _text_message(message_id, str(message.get("role")), str(message.get("content") or ""))
    stamp = message.get("createdAt") or message.get("created_at")
    if isinstance(stamp, str):
        out["createdAt"] = _epoch(stamp)
    return out
