"""What the API tests share: keys and tokens made here, the server's settings, an SSE parser, a server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatsync.config import Secret, Settings

ISSUER = "https://clerk.chatsync.test"
ORIGIN = "https://app.example.com"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"chatsync-test-webhook-secret-32b").decode()


def keypair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, public


SIGNING_KEY, PUBLIC_PEM = keypair()
FOREIGN_KEY, _ = keypair()


def api_settings(engine: Any, **values: Any) -> Settings:
    """Settings of a test server: the keys made here, one admin, the webhook secret."""
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        clerk_jwt_key=PUBLIC_PEM,
        clerk_issuer=ISSUER,
        clerk_authorized_parties=(ORIGIN,),
        clerk_webhook_secret=Secret(WEBHOOK_SECRET),
        admin_user_ids=("user_admin",),
        **values,
    )


def token(key: Any = None, drop: tuple[str, ...] = (), **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "user_a", "iss": ISSUER, "azp": ORIGIN, "iat": now - 10, "nbf": now - 10, "exp": now + 300}
    body.update(claims)
    for name in drop:
        body.pop(name, None)
    return jwt.encode(body, key or SIGNING_KEY, algorithm="RS256", headers={"kid": "ins_test"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(alg: str) -> str:
    """A token PyJWT would refuse to make: alg none, or HS256 keyed with the public key."""
    now = int(time.time())
    payload = {"sub": "user_a", "iss": ISSUER, "azp": ORIGIN, "iat": now, "nbf": now, "exp": now + 300}
    signing_input = (
        _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + _b64(json.dumps(payload).encode())
    )
    if alg == "none":
        return signing_input + "."
    signature = hmac.new(PUBLIC_PEM.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events of a text/event-stream body: ``{"event", "id", "data"}`` with the data parsed as JSON."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append({**fields, "data": json.loads(fields.get("data", "null"))})
    return events


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


PROMPT = "May I have your WhatsApp number?"


def conversation(cid: str, bot: str, reply: str = "9123 4567") -> dict[str, Any]:
    return {
        "id": cid,
        "chatbot_id": bot,
        "created_at": "2024-05-01T08:00:00Z",
        "source": "WhatsApp",
        "messages": [{"role": "assistant", "content": PROMPT}, {"role": "user", "content": reply}],
    }


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=1, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
