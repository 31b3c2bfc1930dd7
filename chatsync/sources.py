"""The names Chatbase gives the channels a conversation comes from, as its filters want them spelt.

Kept apart from the client so that code reading stored conversations never loads the HTTP stack.
"""

from __future__ import annotations

from chatsync.errors import UsageError

V1_SOURCES = (  # what get-conversations' filteredSources takes
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
# The v2 export's ``source`` values (its OpenAPI enum, in order); its filter takes them comma-separated.
V2_SOURCES = (
    "API",
    "WhatsApp",
    "Messenger",
    "Instagram",
    "Slack",
    "Salesforce",
    "Zendesk",
    "Zendesk Messaging",
    "Chatbase site",
    "Playground",
    "Action preview",
    "Qna preview",
    "Widget or Iframe",
    "Center stage",
    "Search",
    "Iframe",
    "Email",
    "Agent page",
    "Phone",
    "Android SDK",
    "iOS SDK",
    "Unspecified",
)
SOURCES = tuple(dict.fromkeys(V1_SOURCES + V2_SOURCES))  # every name a stored conversation may carry


def canonical_source(name: str, known: tuple[str, ...] = SOURCES) -> str:
    """Chatbase's exact spelling of a source named in any case, out of ``known`` (a misspelt filter
    silently matches nothing); else a UsageError listing them."""
    for spelt in known:
        if spelt.lower() == name.strip().lower():
            return spelt
    raise UsageError(f"unknown source {name!r}: expected one of {', '.join(known)}")
