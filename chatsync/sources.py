"""The names Chatbase gives the channels a conversation comes from, as its filters want them spelt.

Kept apart from the client so that code reading stored conversations never loads the HTTP stack.
"""

from __future__ import annotations

from chatsync.errors import UsageError

SOURCES = (
    "API",
    "Chatbase site",
    "Instagram",
    "Messenger",
    "Slack",
    "Unspecified",
    "WhatsApp",
    "Widget or Iframe",
    "Playground",
    "Action preview",
)


def canonical_source(name: str) -> str:
    """Chatbase's exact spelling of a source named in any case (a misspelt filter silently matches nothing)."""
    for known in SOURCES:
        if known.lower() == name.strip().lower():
            return known
    raise UsageError(f"unknown source {name!r}: expected one of {', '.join(SOURCES)}")
