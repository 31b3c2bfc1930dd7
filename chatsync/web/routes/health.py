"""``GET /healthz``: liveness and database reachability, no token needed."""

from fastapi import APIRouter
from sqlalchemy import text

from chatsync.web.deps import ReaderDep
from chatsync.web.errors import ApiError, declared
from chatsync.web.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=declared(503))
def health(engine: ReaderDep) -> Health:
    """Liveness and database reachability."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        raise ApiError(503, "database_unreachable", "the database does not answer") from None
    return Health(status="ok", database="ok")
