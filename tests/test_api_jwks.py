"""Key rotation with CLERK_JWKS_URL, against a JWKS server the test runs on loopback.

A key removed from the key set stops verifying within the key-set cache lifetime (tokens already verified
included); a new key id is fetched at once; made-up key ids cannot make the server hammer the JWKS URL.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest

from chatsync.web.auth import JWKS_REFETCH_SECONDS, ClerkSettings, ClerkVerifier, Unauthorized
from tests.api_helpers import FOREIGN_KEY, ISSUER, ORIGIN, SIGNING_KEY, keypair


class KeySet:
    """The JWKS the test server publishes; ``hits`` counts its fetches."""

    def __init__(self, **keys: Any) -> None:
        self.keys = keys
        self.hits = 0

    def body(self) -> bytes:
        jwks = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return json.dumps({"keys": jwks}).encode()


@pytest.fixture
def jwks() -> Iterator[tuple[KeySet, str]]:
    published = KeySet(key_a=SIGNING_KEY, key_b=FOREIGN_KEY)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            published.hits += 1
            body = published.body()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield published, f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


def signed(key: Any, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "user_a", "iss": ISSUER, "azp": ORIGIN, "iat": now - 5, "nbf": now - 5, "exp": now + 600}
    return jwt.encode({**body, **claims}, key, algorithm="RS256", headers={"kid": kid})


def verifier(url: str, cache_seconds: float) -> ClerkVerifier:
    return ClerkVerifier(
        ClerkSettings(
            issuer=ISSUER, authorized_parties=(ORIGIN,), jwks_url=url, jwks_cache_seconds=cache_seconds
        )
    )


def test_a_key_removed_from_the_key_set_is_refused_within_the_cache_lifetime(
    jwks: tuple[KeySet, str],
) -> None:
    published, url = jwks
    check = verifier(url, cache_seconds=1.0)
    earlier = signed(SIGNING_KEY, "key_a", sub="user_early")
    assert check.verify_token(earlier).caller.user_id == "user_early"
    assert check.verify_token(signed(FOREIGN_KEY, "key_b")).caller.user_id == "user_a"

    published.keys = {"key_b": FOREIGN_KEY}  # A+B → B: key A is retired
    time.sleep(1.2)  # past the cache lifetime
    with pytest.raises(Unauthorized):
        check.verify_token(signed(SIGNING_KEY, "key_a"))  # a token newly signed with the retired key
    with pytest.raises(Unauthorized):
        check.verify_token(earlier)  # and one verified while A was still published
    assert check.verify_token(signed(FOREIGN_KEY, "key_b", sub="user_b")).caller.user_id == "user_b"


def test_a_new_key_id_is_fetched_at_once_and_made_up_ones_do_not_hammer_the_jwks(
    jwks: tuple[KeySet, str],
) -> None:
    published, url = jwks
    published.keys = {"key_a": SIGNING_KEY}
    check = verifier(url, cache_seconds=300)
    assert check.verify_token(signed(SIGNING_KEY, "key_a")).caller.user_id == "user_a"
    assert published.hits == 1

    new_key, _ = keypair()
    published.keys = {"key_a": SIGNING_KEY, "key_c": new_key}
    time.sleep(JWKS_REFETCH_SECONDS + 0.2)  # the refetch cooldown since the first fetch
    assert check.verify_token(signed(new_key, "key_c", sub="user_c")).caller.user_id == "user_c"
    assert published.hits == 2  # fetched at once, long before the 5-minute cache would expire

    for n in range(50):
        with pytest.raises(Unauthorized):
            check.verify_token(signed(new_key, f"made_up_{n}"))
    assert published.hits <= 3  # at most one refetch per cooldown, however many unknown ids come


def test_a_key_set_that_cannot_be_fetched_is_a_503_not_a_401(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid users got 401, and nothing was logged, while the JWKS endpoint was down."""
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from chatsync.web.app import create_app
    from tests.api_helpers import api_settings

    down = "http://127.0.0.1:9/.well-known/jwks.json"  # nothing listens on port 9
    settings = replace(api_settings(engine), clerk_jwt_key=None, clerk_jwks_url=down)
    client = TestClient(create_app(engine, settings))
    with caplog.at_level("WARNING", logger="chatsync.web"):
        response = client.get(
            "/api/conversations", headers={"Authorization": f"Bearer {signed(SIGNING_KEY, 'key_a')}"}
        )
    assert response.status_code == 503 and response.json()["error"]["code"] == "keys_unavailable"
    assert any("CLERK_JWKS_URL" in r.getMessage() for r in caplog.records)
