"""Clerk session tokens, verified locally with the instance's public key (no call to Clerk per request).

Every check of spec/http-api.md: RS256 only; ``exp``, ``iat``, ``nbf``, ``sub``, ``iss`` required; the
issuer must match; ``azp`` must be present and allowed; 5 s clock skew; a pending session is refused.
A failure says nothing that helps an attacker.

With ``CLERK_JWKS_URL`` the key set is PyJWT's ``PyJWKClient`` cache: the whole set is trusted for
``CHATSYNC_JWKS_CACHE`` (5 minutes) and then fetched again, so a key removed from the set stops working
within that time; a token naming a key id the cached set lacks makes it fetch the set at once, at most
once per :data:`JWKS_REFETCH_SECONDS`, so made-up key ids cannot make us hammer the JWKS endpoint.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from chatsync.config import Settings
from chatsync.errors import ConfigError
from chatsync.store.access import Caller

CLOCK_SKEW_SECONDS = 5
JWKS_REFETCH_SECONDS = 2.0


class Unauthorized(Exception):
    """No valid session token: 401 with ``WWW-Authenticate: Bearer``.

    ``reason`` is for the server's log (an operator diagnosing a wrong CLERK_ISSUER or authorized party),
    never for the response; it holds no part of the token."""

    def __init__(self, reason: str = "no token") -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """The JWKS key set could not be fetched: the server cannot tell a good token from a bad one (503)."""


class Forbidden(Exception):
    """A valid token whose session may not be used yet (``sts: pending``): 403."""


@dataclass(frozen=True)
class Session:
    """A verified session token: who called, and when the token expires (epoch seconds)."""

    caller: Caller
    expires: int


@dataclass(frozen=True)
class ClerkSettings:
    """What verifying a token needs; see :meth:`from_settings`."""

    issuer: str
    authorized_parties: tuple[str, ...]
    public_key: str | None = None
    jwks_url: str | None = None
    jwks_cache_seconds: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ClerkSettings:
        """The Clerk part of the settings; ConfigError naming what is missing (``serve`` refuses to start)."""
        missing = [
            name
            for name, present in (
                ("CLERK_JWT_KEY or CLERK_JWKS_URL", settings.clerk_jwt_key or settings.clerk_jwks_url),
                ("CLERK_ISSUER", settings.clerk_issuer),
                ("CLERK_AUTHORIZED_PARTIES", settings.clerk_authorized_parties),
            )
            if not present
        ]
        if missing:
            raise ConfigError(
                f"the API needs {', '.join(missing)}: set them from your Clerk instance (to try it without one, "
                "see docs/api.md, 'Trying it without a Clerk instance')"
            )
        return cls(
            issuer=settings.clerk_issuer or "",
            authorized_parties=settings.clerk_authorized_parties,
            public_key=settings.clerk_jwt_key,
            jwks_url=settings.clerk_jwks_url,
            jwks_cache_seconds=max(1.0, settings.jwks_cache.total_seconds()),
        )


class ClerkVerifier:
    """Verifies tokens. A token already verified is remembered until it expires, or until the key set it
    was checked against is due to be fetched again (the frontend reuses a token for about a minute, and
    an RSA check per request is the largest cost of a small request)."""

    CACHE_SIZE = 4096

    def __init__(self, settings: ClerkSettings) -> None:
        import jwt

        self.settings = settings
        self._jwks = (
            jwt.PyJWKClient(
                settings.jwks_url,
                cache_keys=False,  # its per-kid cache never expires: a removed key would live on
                cache_jwk_set=True,
                lifespan=settings.jwks_cache_seconds,
                cooldown_duration=JWKS_REFETCH_SECONDS,
                timeout=10,
            )
            if settings.jwks_url
            else None
        )
        self._trust_seconds = settings.jwks_cache_seconds if self._jwks is not None else float("inf")
        self._verified: dict[str, tuple[Session, float]] = {}  # token → (session, remembered until)
        self._lock = threading.Lock()

    def _key(self, token: str) -> Any:
        if self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key
        return self.settings.public_key

    def verify(self, authorization: str | None) -> Session:
        """The session of an ``Authorization: Bearer …`` header (the scheme in any case)."""
        if not authorization:
            raise Unauthorized("no Authorization header")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("not a Bearer token")
        return self.verify_token(token)

    def remembered(self, token: str) -> Session | None:
        """The session of a token verified a moment ago, without any work (None: verify it)."""
        known = self._verified.get(token)
        return known[0] if known is not None and known[1] > time.time() else None

    def verify_token(self, token: str) -> Session:
        """The session of a bare token; Unauthorized (401) or Forbidden (403). May fetch the JWKS."""
        token = token.strip()
        if not token or " " in token:
            raise Unauthorized("not a Bearer token")
        now = time.time()
        known = self.remembered(token)
        if known is not None:
            return known
        session = self._verify(token)
        until = min(session.expires + CLOCK_SKEW_SECONDS, now + self._trust_seconds)
        with self._lock:
            if len(self._verified) >= self.CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = (session, until)
        return session

    def _verify(self, token: str) -> Session:
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
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailable(str(exc)[:200]) from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(f"issuer is not CLERK_ISSUER ({self.settings.issuer})") from None
        except (
            jwt.PyJWTError
        ) as exc:  # expired, not yet valid, a claim missing, a bad signature, an unknown key…
            raise Unauthorized(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # a key set that cannot be fetched, a token that is not a JWT
            raise Unauthorized(type(exc).__name__) from None
        party = claims.get("azp")
        if not isinstance(party, str) or party not in self.settings.authorized_parties:
            shown = repr(party)[:100] if isinstance(party, str) else "none"
            raise Unauthorized(f"authorized party {shown} is not in CLERK_AUTHORIZED_PARTIES")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("no subject (sub)")
        if claims.get("sts") == "pending":
            raise Forbidden()
        org: dict[str, Any] = claims["o"] if isinstance(claims.get("o"), dict) else {}
        org_id = org.get("id") or claims.get("org_id")
        role = org.get("rol") or claims.get("org_role")
        if role and not str(role).startswith("org:"):
            role = f"org:{role}"
        caller = Caller(subject, str(org_id) if org_id else None, str(role) if role else None)
        return Session(caller, int(claims["exp"]))
