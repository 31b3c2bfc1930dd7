"""A Chatbase-compatible emulator: the same endpoints, parameters, quirks, limits and failures.

Tests, the demo and the benchmark use it instead of the real Chatbase. Use it in-process through
:class:`EmulatorTransport` (an httpx transport) or over loopback with :func:`serve_in_thread` /
``chatsync emulator``.
"""

from chatsync.emulator.server import (
    Emulator,
    EmulatorTransport,
    Faults,
    RunningEmulator,
    serve_in_thread,
)

__all__ = ["Emulator", "EmulatorTransport", "Faults", "RunningEmulator", "serve_in_thread"]
