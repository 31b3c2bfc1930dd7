"""A Chatbase-compatible emulator: the same endpoints, parameters, quirks, limits and failures.

Tests, the demo and the benchmark use it instead of the real Chatbase. Use it in-process through
:class:`EmulatorTransport` (an httpx transport) or over loopback with :func:`serve_in_thread` /
``chatsync emulator``. It serves API v1 (``get-conversations``, ``get-leads``, ``get-chatbots``) and API
v2 (``agents``, ``agents/{id}/conversations/export``) from the same data; :mod:`.webhooks` builds signed
``leads.submit`` deliveries.
"""

from chatsync.emulator.data import ExportTruth, Lead, Planted
from chatsync.emulator.server import (
    Emulator,
    EmulatorTransport,
    Faults,
    RunningEmulator,
    serve_in_thread,
)

__all__ = [
    "Emulator",
    "EmulatorTransport",
    "ExportTruth",
    "Faults",
    "Lead",
    "Planted",
    "RunningEmulator",
    "serve_in_thread",
]
