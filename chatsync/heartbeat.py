"""Tell a monitor that a cron run happened: healthchecks.io-style pings, after every `chatsync sync`.

``CHATSYNC_HEARTBEAT_URL`` is requested (POST, the run's summary line as the body) when the run ends ok,
and ``…/fail`` when it does not, so the monitor alerts both on failures and on runs that never come.
A monitor that does not answer never changes how the run ends; the URL (which holds a token) is never
printed or logged.
"""

from __future__ import annotations

import logging

from chatsync.config import Secret

log = logging.getLogger("chatsync.heartbeat")


def ping(url: Secret, ok: bool, body: str, timeout: float = 10.0) -> bool:
    """POST ``body`` to the heartbeat URL (``/fail`` appended unless ``ok``); True when it answered 2xx."""
    import httpx

    target = url.reveal().rstrip("/") + ("" if ok else "/fail")
    try:
        response = httpx.post(
            target, content=body.encode(), timeout=timeout, headers={"User-Agent": "chatsync"}
        )
    except httpx.HTTPError as exc:
        log.warning("heartbeat not delivered: %s", type(exc).__name__)
        return False
    if response.is_success:
        return True
    log.warning("heartbeat not delivered: the monitor answered %d", response.status_code)
    return False
