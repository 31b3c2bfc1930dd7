"""Clerk session tokens, verified locally with the instance's public key (no call to Clerk per request).

Every check of spec/http-api.md: RS256 only; ``exp``, ``iat``, ``nbf``, ``sub``, ``iss`` required; the
issuer must match; ``azp`` must be present and allowed; 5 s clock skew; a pending session is refused.
A failure says nothing that helps an attacker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from chatsync.errors import ConfigError
from chatsync.store.access import Caller

CLOCK_SKEW_SECONDS = 5


class Unauthorized(Exception):
    """No valid session token: 401 with ``WWW-Authenticate: Bearer``."""


class Forbidden(Exception):
    """A valid token whose session may not be used yet (``sts: pending``): 403."""


@dataclass(frozen=True)
class ClerkSettings:
    issuer: str
    authorized_parties: tuple[str, ...]
    public_key: str | None = None
    jwks_url: str | None = None
    webhook_secret: str | None = None
    admin_user_ids: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ClerkSettings:
        """Read CLERK_* settings; ``serve`` refuses to start without a key, the issuer and the parties."""
        env = dict(os.environ) if env is None else env
        key = env.get("CLERK_JWT_KEY", "").replace("\\n", "\n").strip() or None
        jwks = env.get("CLERK_JWKS_URL", "").strip() or None
        issuer = env.get("CLERK_ISSUER", "").strip()
        parties = tuple(p.strip() for p in env.get("CLERK_AUTHORIZED_PARTIES", "").split(",") if p.strip())
        missing = [
            name
            for name, present in (
                ("CLERK_JWT_KEY or CLERK_JWKS_URL", key or jwks),
                ("CLERK_ISSUER", issuer),
                ("CLERK_AUTHORIZED_PARTIES", parties),
            )
            if not present
        ]
        if missing:
            raise ConfigError(f"the API needs {', '.join(missing)}: set them from your Clerk instance")
        admins = tuple(a.strip() for a in env.get("CHATSYNC_ADMIN_USER_IDS", "").split(",") if a.strip())
        return cls(
            issuer=issuer,
            authorized_parties=parties,
            public_key=key,
            jwks_url=jwks,
            webhook_secret=env.get("CLERK_WEBHOOK_SIGNING_SECRET") or None,
            admin_user_ids=admins,
        )


class ClerkVerifier:
    """Verifies tokens; a token already verified is remembered until it expires (the frontend reuses one
    for about a minute, and an RSA check per request is the largest cost of a small request)."""

    CACHE_SIZE = 4096

    def __init__(self, settings: ClerkSettings) -> None:
        import threading

        import jwt

        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True) if settings.jwks_url else None
        self._verified: dict[str, tuple[Caller, int]] = {}
        self._lock = threading.Lock()

    def _key(self, token: str) -> Any:
        if self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key
        return self.settings.public_key

    def verify(self, authorization: str | None) -> tuple[Caller, int]:
        """The caller of an ``Authorization`` header, and when their token expires (epoch seconds)."""

        if not authorization:
            raise Unauthorized()
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthorized()
        import time

        known = self._verified.get(token)
        if known is not None and known[1] + CLOCK_SKEW_SECONDS > time.time():
            return known
        caller = self._verify(token)
        with self._lock:
            if len(self._verified) >= self.CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = caller
        return caller

    def _verify(self, token: str) -> tuple[Caller, int]:
        import jwt

        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=["RS256"],
                issuer=self.settings.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "iat", "nbf", "sub", "iss"], "verify_aud": False},
            )
        except Exception:
            raise Unauthorized() from None
        party = claims.get("azp")
        if not isinstance(party, str) or party not in self.settings.authorized_parties:
            raise Unauthorized()
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized()
        if claims.get("sts") == "pending":
            raise Forbidden()
        org: dict[str, Any] = claims["o"] if isinstance(claims.get("o"), dict) else {}
        org_id = org.get("id") or claims.get("org_id")
        role = org.get("rol") or claims.get("org_role")
        if role and not str(role).startswith("org:"):
            role = f"org:{role}"
        return Caller(subject, str(org_id) if org_id else None, str(role) if role else None), int(
            claims["exp"]
        )
