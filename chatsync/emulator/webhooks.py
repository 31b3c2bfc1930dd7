"""Chatbase's ``leads.submit`` webhook as Chatbase would deliver it, signed, for tests of the receiver.

Chatbase signs the raw request body with the endpoint's secret: ``x-chatbase-signature`` is the
lowercase hex HMAC-SHA1 of the exact bytes sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from chatsync.emulator.data import Lead

SIGNATURE_HEADER = "x-chatbase-signature"


def signature(body: bytes, secret: str) -> str:
    """The ``x-chatbase-signature`` of ``body``: hex HMAC-SHA1 keyed with ``secret``."""
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def leads_submit(lead: Lead, secret: str) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers of the ``leads.submit`` delivery for ``lead``, signed with ``secret``.

    Body: ``{"eventType": "leads.submit", "chatbotId", "payload": {"conversationId", "customerEmail",
    "customerName", "customerPhone"}}``, every payload value a string as typed.
    """
    event = {
        "eventType": "leads.submit",
        "chatbotId": lead.chatbot_id,
        "payload": {
            "conversationId": lead.conversation_id,
            "customerEmail": lead.email,
            "customerName": lead.name,
            "customerPhone": lead.phone,
        },
    }
    body = json.dumps(event, ensure_ascii=False).encode()
    return body, {"content-type": "application/json", SIGNATURE_HEADER: signature(body, secret)}
