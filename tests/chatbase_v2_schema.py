"""Chatbase API v2 export shapes as JSON Schema, written from Chatbase's published v2 OpenAPI (2.0.0).

``ExportConversationsResponse``, ``ExportConversation``, ``ExportMessage`` (its three part variants: the
export's ``tool-call`` has no ``input``), ``MessageMetadata`` and ``ErrorResponse``. The emulator's pages
and the hand-written cassettes are checked against these, so neither drifts from the contract.
"""

from __future__ import annotations

from typing import Any

SOURCES = [
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
    None,
]

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_TOOL_CALL_PART = {
    "type": "object",
    "required": ["type", "toolCallId", "toolName"],
    "properties": {
        "type": {"const": "tool-call"},
        "toolCallId": {"type": "string"},
        "toolName": {"type": "string"},
    },
    "not": {"required": ["input"]},  # the export sanitises tool calls
}
_TOOL_RESULT_PART = {
    "type": "object",
    "required": ["type", "toolCallId", "toolName"],
    "properties": {
        "type": {"const": "tool-result"},
        "toolCallId": {"type": "string"},
        "toolName": {"type": "string"},
        "output": {},
    },
}
EXPORT_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "role", "parts"],
    "properties": {
        "id": {"type": "string"},
        "role": {"enum": ["user", "assistant"]},
        "parts": {"type": "array", "items": {"oneOf": [_TEXT_PART, _TOOL_CALL_PART, _TOOL_RESULT_PART]}},
        "createdAt": {"type": "number"},
        "feedback": {"enum": ["positive", "negative", None]},
        "metadata": {
            "type": "object",
            "required": ["score"],
            "properties": {"score": {"type": ["number", "null"], "minimum": 0, "maximum": 1}},
        },
    },
}
EXPORT_CONVERSATION: dict[str, Any] = {
    "type": "object",
    "required": ["id", "title", "createdAt", "updatedAt", "userId", "source", "status"],
    "properties": {
        "id": {"type": "string"},
        "title": {"type": ["string", "null"]},
        "createdAt": {"type": "number"},
        "updatedAt": {"type": "number"},
        "userId": {"type": ["string", "null"]},
        "source": {"enum": SOURCES},
        "status": {"enum": ["ongoing", "ended", "taken_over", "paused"]},
        "messages": {"type": "array", "items": EXPORT_MESSAGE},
    },
}
EXPORT_PAGE: dict[str, Any] = {
    "type": "object",
    "required": ["data", "pagination"],
    "properties": {
        "data": {"type": "array", "items": EXPORT_CONVERSATION},
        "pagination": {
            "type": "object",
            "required": ["cursor", "hasMore", "total"],
            "properties": {
                "cursor": {"type": ["string", "null"]},
                "hasMore": {"type": "boolean"},
                "total": {"type": "number"},
            },
        },
    },
}
ERROR_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    },
}


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    """Every way ``instance`` breaks ``schema`` (empty when it conforms)."""
    import jsonschema_rs

    validator = jsonschema_rs.Draft202012Validator(schema)
    return [f"{list(error.instance_path)}: {error.message}" for error in validator.iter_errors(instance)]
