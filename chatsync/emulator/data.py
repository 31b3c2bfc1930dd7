"""Deterministic, realistic Chatbase conversations for the emulator.

Conversation ``i`` of a chatbot is a pure function of (seed, chatbot, i), and creation times grow with
``i``, so a date range maps to an index range by bisection: the emulator serves millions of conversations
without holding them. Each conversation also carries the ground truth chatsync must find (the planted
WhatsApp number and where it came from), written down by the generator rather than by the extractor.
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

    def __init__(self, chatbot_id: str, count: int, seed: int, end: datetime, days: float) -> None:
        self.chatbot_id = chatbot_id
        self.count = count
        self.seed = seed
        self.end = end
        self.days = days
        digest = hashlib.sha256(f"{seed}:{chatbot_id}".encode()).digest()
        self._prefix = int.from_bytes(digest[:8], "big")
        self._span = timedelta(days=days).total_seconds()
        self._start = end.timestamp() - self._span

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
        """Conversation ``index`` as Chatbase would send it, with the ground truth planted in it."""
        rng = random.Random(self._prefix ^ (index * 0x9E3779B97F4A7C15))
        created = self.created_ts(index)
        source = _weighted(rng, SOURCES)
        stamp_style = rng.choices(["createdAt", "created_at", None], weights=[50, 25, 25])[0]
        msgs: list[tuple[str, str]] = []
        planted_number: str | None = None
        left = False

        if rng.random() < 0.25:
            msgs.append(("assistant", rng.choice(GREETINGS)))
            if rng.random() < 0.5:
                msgs.append(("user", "hi"))
        if rng.random() < 0.88:
            msgs.append(("assistant", rng.choice(PROMPTS)))
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
                msgs.append(("user", reply))
                planted_number = f"+{cc}{national}"
            elif roll < 0.78:
                _, first = _mobile(rng, "852")
                _, second = _mobile(rng, "852")
                msgs.append(("user", f"{first[:4]} {first[4:]} or {second[:4]} {second[4:]}"))
            elif roll < 0.88:
                _, national = _mobile(rng)
                msgs.append(("user", rng.choice(NON_NUMBERS).format(a=national[:4], b=national[4:])))
            else:
                msgs.append(("user", rng.choice(REFUSALS)))
        for _ in range(0 if left else rng.choice([0, 1, 2, 2, 3, 3, 4, 6])):
            question, answer = rng.choice(QUESTIONS)
            msgs.append(("user", question))
            msgs.append(("assistant", answer))
        if not left and rng.random() < 0.3:
            msgs.append(("assistant", rng.choice(CLOSERS)))

        messages: list[dict[str, Any]] = []
        moment = created
        for position, (role, content) in enumerate(msgs):
            moment += rng.uniform(1.0, 6.0) if role == "assistant" else rng.uniform(4.0, 90.0)
            message: dict[str, Any] = {"role": role, "content": content, "type": "text"}
            if role == "user":
                message["id"] = f"msg_{index:x}_{position}"
            else:
                message["score"] = round(rng.uniform(0.4, 1.0), 3)
            if stamp_style:
                message[stamp_style] = _iso(moment)
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
        return raw, planted


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
