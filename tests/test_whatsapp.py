"""The WhatsApp rule against the corpus, properties of its formats, and the conversation-level steps."""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import phonenumbers
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chatsync.config import WhatsAppRule
from chatsync.errors import InvalidNumber
from chatsync.whatsapp import (
    AMBIGUOUS,
    CAPTURED,
    NO_PROMPT,
    NO_REPLY,
    NOT_FOUND,
    extract_conversation,
    extract_reply,
    is_prompt,
    normalize_number,
)

DATA = Path(__file__).parent / "data"


def _corpus(name: str) -> list[dict]:
    """The acceptance cases kept with the tests: one JSON object a line."""
    with (DATA / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


REPLIES = _corpus("whatsapp_replies.jsonl")
PROMPTS = _corpus("whatsapp_prompts.jsonl")


def test_corpora_are_kept_with_the_tests() -> None:
    assert len(REPLIES) >= 80 and len(PROMPTS) >= 15
    assert len({c["id"] for c in REPLIES}) == len(REPLIES)
    assert len({c["id"] for c in PROMPTS}) == len(PROMPTS)


@pytest.mark.parametrize(
    ("reply", "mode", "expected"),
    [
        pytest.param(c["reply"], mode, c[mode], id=f"{c['id']}-{mode}")
        for c in REPLIES
        for mode in ("strict", "off")
    ],
)
def test_each_corpus_reply_stores_its_expected_number(reply: str, mode: str, expected: str | None) -> None:
    assert extract_reply(reply, WhatsAppRule(validation=mode)).number == expected


@pytest.mark.parametrize(
    ("message", "expected"), [pytest.param(c["message"], c["is_prompt"], id=str(c["id"])) for c in PROMPTS]
)
def test_each_corpus_prompt_is_recognised_as_expected(message: str, expected: bool) -> None:
    assert is_prompt(message) is expected


# ------------------------------------------------------------------------------------------------ properties
FULL_WIDTH = str.maketrans("0123456789+-", "０１２３４５６７８９＋－")
FORMATS = [
    "{a}{b}",
    "{a} {b}",
    "{a}-{b}",
    "{a}.{b}",
    "+{cc} {a} {b}",
    "+{cc}-{a}-{b}",
    "+{cc}{a}{b}",
    "{cc} {a} {b}",
    "{cc}-{a}{b}",
    "{cc}{a}{b}",
    "{cc}{a} {b}",
    "00{cc} {a} {b}",
    "00{cc}{a}{b}",
    "({cc}) {a} {b}",
    "(+{cc}) {a}-{b}",
    "+({cc}) {a} {b}",
]
SURROUNDINGS = [
    "{n}",
    "my number is {n}",
    "我的電話是 {n}，謝謝",
    "WhatsApp: {n}!",
    "call me on {n} thanks",
    "{n}。",
]
REGIONS = {"852": ("HK", "569"), "853": ("MO", "6"), "65": ("SG", "89")}


@st.composite
def valid_numbers(draw: st.DrawFn) -> tuple[str, str]:
    cc = draw(st.sampled_from(sorted(REGIONS)))
    first = draw(st.sampled_from(REGIONS[cc][1]))
    rest = draw(st.text(alphabet="0123456789", min_size=7, max_size=7))
    national = first + rest
    parsed = phonenumbers.parse(f"+{cc}{national}", None)
    assume(phonenumbers.is_valid_number(parsed))
    assume(phonenumbers.number_type(parsed) in (phonenumbers.PhoneNumberType.MOBILE,))
    return cc, national


@settings(max_examples=300, deadline=None)
@given(valid_numbers(), st.sampled_from(FORMATS), st.sampled_from(SURROUNDINGS), st.booleans())
def test_every_accepted_format_gives_the_same_number(
    number: tuple[str, str], fmt: str, around: str, full_width: bool
) -> None:
    cc, national = number
    if cc != "852" and "{cc}" not in fmt:
        fmt = "+{cc} " + fmt  # without a country code a number means the default region (HK)
    written = fmt.format(cc=cc, a=national[:4], b=national[4:])
    if full_width:
        written = written.translate(FULL_WIDTH)
    reply = around.format(n=written)
    assert extract_reply(reply).number == f"+{cc}{national}", reply


@settings(max_examples=200, deadline=None)
@given(valid_numbers(), st.sampled_from(FORMATS), st.sampled_from(["$", "HK$", "S$", "#", "USD ", "€"]))
def test_money_and_ids_give_nothing(number: tuple[str, str], fmt: str, prefix: str) -> None:
    cc, national = number
    written = fmt.format(cc=cc, a=national[:4], b=national[4:])
    assert extract_reply(prefix + written).number is None


@settings(max_examples=200, deadline=None)
@given(valid_numbers(), st.sampled_from(FORMATS), st.sampled_from("0123456789"))
def test_an_appended_digit_gives_nothing(number: tuple[str, str], fmt: str, digit: str) -> None:
    cc, national = number
    written = fmt.format(cc=cc, a=national[:4], b=national[4:]) + digit
    assert extract_reply(written).number is None


# ------------------------------------------------------------------------ invisible characters, country codes
@lru_cache(maxsize=1)
def _unicode_classes() -> tuple[list[str], list[str]]:
    """From the Unicode database itself: (invisible characters, characters that are no letter and no digit).

    Invisible: every format character (Cf) and every variation selector. No letter and no digit: spaces,
    punctuation and symbols (emoji included) that stay so under NFKC.
    """
    invisible, between = [], []
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        kind = unicodedata.category(ch)
        if kind == "Cf" or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:
            invisible.append(ch)
        elif kind[0] in "PSZ" and not any(c.isalnum() for c in unicodedata.normalize("NFKC", ch)):
            between.append(ch)
    return invisible, [*between, "\n", "\r\n", "\t"]


INVISIBLE = st.deferred(lambda: st.sampled_from(_unicode_classes()[0]))
BETWEEN = st.deferred(lambda: st.sampled_from(_unicode_classes()[1]))


@st.composite
def sprinkled(draw: st.DrawFn, text: str) -> str:
    """``text`` with 1–6 invisible characters inserted at any places."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 6))):
        chars.insert(draw(st.integers(0, len(chars))), draw(INVISIBLE))
    return "".join(chars)


def _visible(text: str) -> str:
    invisible = set(_unicode_classes()[0])
    return "".join(c for c in text if c not in invisible)


@settings(max_examples=300, deadline=None)
@given(valid_numbers(), st.sampled_from(FORMATS), st.sampled_from(SURROUNDINGS), st.data())
def test_invisible_characters_anywhere_never_change_the_stored_number(
    number: tuple[str, str], fmt: str, around: str, data: st.DataObject
) -> None:
    cc, national = number
    if cc != "852" and "{cc}" not in fmt:
        fmt = "+{cc} " + fmt
    reply = around.format(n=fmt.format(cc=cc, a=national[:4], b=national[4:]))
    noisy = data.draw(sprinkled(reply))
    clean = extract_reply(reply)
    found = extract_reply(noisy)
    assert found.number == clean.number == f"+{cc}{national}", ascii(noisy)
    # the span shown to staff is the original text: the clean one plus the invisible characters inside it
    assert found.matched is not None and found.matched in noisy
    assert _visible(found.matched) == clean.matched


FOREIGN_CODES = sorted(
    str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE if code not in (852, 853, 65)
)
REJECTED = [
    "+{fcc} {a} {b}",
    "+{fcc}-{a}{b}",
    "00{fcc} {a}{b}",
    "+{fcc} / {a} {b}",
    "(+{fcc}) — {a} {b}",
    "+{fcc} 🙂 {a} {b}",
    "00{fcc} ・ {a}{b}",
    "+{fcc}\n{a} {b}",
    "+{cc} / {a} {b}",
    "(+{cc}): {a}{b}",
    "{cc}{a} {b}7",
    "+{cc} {a} {b} 8",
    "HK${a}{b}",
    "order {a}{b}",
]


@settings(max_examples=300, deadline=None)
@given(
    valid_numbers(),
    st.sampled_from(FOREIGN_CODES),
    st.sampled_from(REJECTED),
    st.sampled_from(["strict", "off"]),
    st.data(),
)
def test_invisible_characters_never_make_a_rejected_reply_a_number(
    number: tuple[str, str], fcc: str, fmt: str, validation: str, data: st.DataObject
) -> None:
    cc, national = number
    rule = WhatsAppRule(validation=validation)
    reply = fmt.format(cc=cc, fcc=fcc, a=national[:4], b=national[4:])
    assert extract_reply(reply, rule).number is None, reply
    noisy = data.draw(sprinkled(reply))
    assert extract_reply(noisy, rule).number is None, ascii(noisy)


@pytest.mark.parametrize(
    "case", [c for c in REPLIES if c["strict"] is None and c["off"] is None], ids=lambda c: str(c["id"])
)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_invisible_characters_never_make_a_rejected_corpus_reply_a_number(
    case: dict, data: st.DataObject
) -> None:
    noisy = data.draw(sprinkled(case["reply"]))
    for validation in ("strict", "off"):
        assert extract_reply(noisy, WhatsAppRule(validation=validation)).number is None, ascii(noisy)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["+{code}", "00{code}", "(+{code})", "+({code})"]),
    st.sampled_from(sorted([*FOREIGN_CODES, "852", "853", "65"])),
    st.lists(BETWEEN, min_size=1, max_size=4).map("".join),
    valid_numbers().filter(lambda n: n[0] == "852"),
    st.sampled_from(["{a} {b}", "{a}{b}", "{a}-{b}"]),
)
def test_digits_after_a_bare_country_code_are_never_read_in_the_default_region(
    marker: str, code: str, between: str, number: tuple[str, str], fmt: str
) -> None:
    """``+65 / 9123 4567``: the digits are the country code's, so the reply gives that country's number or none."""
    national = number[1]
    reply = marker.format(code=code) + between + fmt.format(a=national[:4], b=national[4:])
    assert extract_reply(reply).number in (None, f"+{code}{national}"), ascii(reply)


@pytest.mark.parametrize(
    ("reply", "number"),
    [
        ("+65 / 9123 4567", None),
        ("+65 / +65 9123 4567", "+6591234567"),  # a country code of its own is not the default region
        ("my UK number is +44, in HK 9123 4567", None),  # words between change nothing: +44's digits
        ("+44 (UK) 9123 4567", None),
        ("9123 4567 (+1 for my wife)", "+85291234567"),  # the "+1" comes after
        ("+44 7911 123456 or 9123 4567", "+85291234567"),  # a whole foreign number, not a bare code
        ("+852 9123 4567 / 9123 4567", "+85291234567"),
        ("9123 4567 / 6123 4567", None),  # two numbers: ambiguous, as before
    ],
)
def test_only_a_bare_country_code_claims_the_digits_after_it(reply: str, number: str | None) -> None:
    assert extract_reply(reply).number == number


def test_a_rejected_candidate_after_a_bare_country_code_says_why() -> None:
    result = extract_reply("+65\n9123 4567")
    assert result.reasons == [
        "+65: wrong length for +65 (2 digits)",
        "9123 4567: belongs to the country code +65 before it",
    ]


def test_matched_span_keeps_the_invisible_characters_inside_it() -> None:
    result = extract_reply("\u2066+65\ufe0d 9123\u200b4567\u2069 thanks")
    assert result.number == "+6591234567"
    assert result.matched == "+65\ufe0d 9123\u200b4567"
    assert (result.candidates[0].start, result.candidates[0].end) == (1, 15)


@pytest.mark.parametrize(
    "text",
    [
        "+65\ufe0d 9123 4567",
        "\u200e+65 9123\u200b4567\u200f",
        "00\u200b65 9123\u00ad4567",
        "\ufeff+6591234567",
    ],
)
def test_normalize_number_ignores_invisible_characters(text: str) -> None:
    assert normalize_number(text) == "+6591234567"


@pytest.mark.parametrize("text", ["+65 / 9123 4567", "+44 🙂 9123 4567", "0065\n91234567"])
def test_normalize_number_refuses_digits_after_a_bare_country_code(text: str) -> None:
    with pytest.raises(InvalidNumber, match="expected 8 digits"):
        normalize_number(text)


def test_candidates_are_never_trimmed() -> None:
    result = extract_reply("ref 912345678901 and 91234567")
    assert [c.text for c in result.candidates] == ["912345678901", "91234567"]
    assert result.number == "+85291234567"


def test_rejected_candidates_say_why() -> None:
    result = extract_reply("HK$91234567 or 2123 4567")
    assert result.outcome == NOT_FOUND
    assert result.reasons == ["91234567: looks like money", "2123 4567: +852 21234567 is not a mobile number"]


def test_matched_span_is_the_original_text() -> None:
    assert extract_reply("我的WhatsApp係：９１２３－４５６７").matched == "９１２３－４５６７"


def test_two_different_numbers_are_ambiguous() -> None:
    assert extract_reply("9123 4567 or 6123 4567").outcome == AMBIGUOUS


def test_default_region_applies_to_eight_digits() -> None:
    assert extract_reply("9123 4567", WhatsAppRule(default_region="SG")).number == "+6591234567"


def test_region_outside_accepted_is_foreign() -> None:
    rule = WhatsAppRule(accepted_regions=("HK",))
    assert extract_reply("+65 9123 4567", rule).number is None


def test_extra_prompt_pattern_is_recognised() -> None:
    rule = WhatsAppRule(extra_prompt_patterns=(r"^Hello! Type your digits",))
    assert is_prompt("Hello! Type your digits to start", rule)
    assert not is_prompt("Hello! Type your digits to start")


@pytest.mark.parametrize("text", ["9123 4567", "+852 9123 4567", "85291234567", "(852) 9123-4567"])
def test_normalize_number_accepts_what_extraction_accepts(text: str) -> None:
    assert normalize_number(text) == "+85291234567"


@pytest.mark.parametrize("text", ["1234", "2024-01-05", "abc", "", "9123 4567 / 6123 4567"])
def test_normalize_number_refuses_with_what_is_expected(text: str) -> None:
    with pytest.raises(InvalidNumber, match="expected 8 digits"):
        normalize_number(text)


# ------------------------------------------------------------------------------------------- conversations
PROMPT = "Hi! May I have your WhatsApp number?"


def test_number_before_the_prompt_is_ignored() -> None:
    messages = [("user", "hi 9123 4567"), ("assistant", PROMPT), ("user", "no thanks")]
    result = extract_conversation(messages)
    assert (result.outcome, result.number) == (NOT_FOUND, None)


def test_prompt_without_reply_is_no_reply() -> None:
    result = extract_conversation([("user", "hello"), ("assistant", PROMPT)])
    assert result.outcome == NO_REPLY


def test_prompt_after_the_third_bot_message_is_ignored() -> None:
    messages = [
        ("assistant", "Hello!"),
        ("user", "hi"),
        ("assistant", "How can I help?"),
        ("user", "prices"),
        ("assistant", "Here they are."),
        ("assistant", PROMPT),
        ("user", "9123 4567"),
    ]
    assert extract_conversation(messages).outcome == NO_PROMPT
    assert extract_conversation(messages, WhatsAppRule(prompt_window=4)).number == "+85291234567"


def test_number_split_across_two_bubbles_is_not_found() -> None:
    messages = [("assistant", PROMPT), ("user", "9123"), ("user", "4567")]
    assert extract_conversation(messages).outcome == NOT_FOUND


def test_later_messages_do_not_count() -> None:
    messages = [("assistant", PROMPT), ("user", "later"), ("assistant", "ok"), ("user", "9123 4567")]
    assert extract_conversation(messages).outcome == NOT_FOUND


def test_first_prompt_counts_and_reply_is_captured() -> None:
    messages = [
        ("assistant", PROMPT),
        ("user", "sure: 9123 4567"),
        ("assistant", PROMPT),
        ("user", "6123 4567"),
    ]
    result = extract_conversation(messages)
    assert (result.outcome, result.number, result.matched) == (CAPTURED, "+85291234567", "9123 4567")
    assert (result.prompt_index, result.reply_index) == (0, 1)


def test_bot_advertising_its_number_is_not_a_prompt() -> None:
    messages = [("assistant", "Our WhatsApp number is 2123 4567."), ("user", "9123 4567")]
    assert extract_conversation(messages).outcome == NO_PROMPT


@pytest.mark.parametrize(
    ("e164", "region"),
    [
        ("+85291234567", "HK"),
        ("+85366123456", "MO"),
        ("+6591234567", "SG"),
        ("+447400123456", "GB"),
        ("+14155552671", "US"),
    ],
)
def test_region_of_a_stored_number(e164: str, region: str) -> None:
    from chatsync.whatsapp import region_of

    assert region_of(e164) == region


# ---------------------------------------------------------------------------------------------- the docs
def _docs_examples() -> list:
    """The rows of the first table of docs/whatsapp.md: (what the user wrote, what is stored)."""
    docs = (Path(__file__).parents[1] / "docs" / "whatsapp.md").read_text(encoding="utf-8")
    table = docs.split("\n\n| the user wrote | stored | why |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        written, stored = (cell.strip().strip("`") for cell in line.strip("|").split(" | ")[:2])
        written = re.sub(r"\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1), 16)), written)
        rows.append(pytest.param(written, None if stored == "nothing" else stored, id=ascii(written)))
    return rows


@pytest.mark.parametrize(("written", "stored"), _docs_examples())
def test_the_examples_of_the_number_rule_docs_hold(written: str, stored: str | None) -> None:
    assert extract_reply(written).number == stored
