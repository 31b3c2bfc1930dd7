"""Dependencies the routes share: the settings, the database engine, the caller and what they may see.

Everything lives on ``app.state`` (set once by :func:`chatsync.web.app.create_app`), so tests build an
app over their own database and keys without touching globals. No ``from __future__ import annotations``:
FastAPI reads these signatures at runtime.
"""

import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from chatsync.config import Settings
from chatsync.store.access import Access, access_for
from chatsync.web.auth import ClerkVerifier, Forbidden, KeysUnavailable, Session, Unauthorized
from chatsync.web.errors import ApiError, declared

bearer = HTTPBearer(
    scheme_name="ClerkSession",
    bearerFormat="JWT",
    description="A Clerk session token, from `getToken()` in the frontend.",
    auto_error=False,
)
AUTHED = declared(401, 403, 503)

log = logging.getLogger("chatsync.web")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_reader(request: Request) -> Engine:
    """The engine in autocommit mode, for routes that only read: no BEGIN and ROLLBACK round trips."""
    return request.app.state.reader


async def get_session(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Session:
    """The verified session of ``Authorization: Bearer …``: 401 without a valid token, 403 while pending.

    A token seen a moment ago is answered on the event loop; verifying a new one (an RSA check, perhaps a
    JWKS fetch) runs in a worker thread.
    """
    from anyio import to_thread

    verifier: ClerkVerifier = request.app.state.verifier
    try:
        if credentials is None:
            raise Unauthorized("no Bearer token")
        session = verifier.remembered(credentials.credentials)
        if session is None:
            session = await to_thread.run_sync(verifier.verify_token, credentials.credentials)
    except Unauthorized as exc:
        log.info("token refused: %s", exc.reason)  # the response says nothing that helps an attacker
        raise ApiError(
            401, "unauthorized", "a valid session token is required", {"WWW-Authenticate": "Bearer"}
        ) from None
    except Forbidden:
        raise ApiError(403, "forbidden", "this session is not active yet") from None
    except KeysUnavailable as exc:
        log.warning("the Clerk key set (CLERK_JWKS_URL) cannot be fetched: %s", exc)
        raise ApiError(503, "keys_unavailable", "sessions cannot be checked right now; try again") from None
    request.state.user_id = session.caller.user_id  # for the access log line
    return session


async def get_access(request: Request, session: Annotated[Session, Depends(get_session)]) -> Access:
    """What the caller may see and sync: admins everything (no query), others their grants."""
    from anyio import to_thread

    settings = get_settings(request)
    if session.caller.user_id in settings.admin_user_ids:
        return Access(visible=None, administers=None)

    def grants() -> Access:
        with get_reader(request).connect() as connection:
            return access_for(connection, session.caller, settings.admin_user_ids)

    return await to_thread.run_sync(grants)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ReaderDep = Annotated[Engine, Depends(get_reader)]
SessionDep = Annotated[Session, Depends(get_session)]
AccessDep = Annotated[Access, Depends(get_access)]
