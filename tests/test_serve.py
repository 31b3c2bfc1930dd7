"""``chatsync serve`` as an operator runs it: every setting from ``.env``, logs a person can search.

The server is a real ``chatsync serve`` process; its stderr is what an operator would read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import text
from svix.webhooks import Webhook

from chatsync.config import WhatsAppRule
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.store.engine import ensure_schema, open_engine
from chatsync.web.app import create_app
from chatsync.web.logs import configure_logging
from tests.api_helpers import (
    ISSUER,
    ORIGIN,
    PUBLIC_PEM,
    WEBHOOK_SECRET,
    api_settings,
    bearer,
    conversation,
    token,
)
from tests.helpers import fake_sentry

FRONTEND = "http://127.0.0.1:3000"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_serving(base: str, server: subprocess.Popen[Any], output: Callable[[], str]) -> None:
    """Wait up to 60 s for ``/healthz`` to answer 200; fail with the server's ``output`` if it exits."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert server.poll() is None, output()
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.2)


def _dotenv(path: Path, database_url: str, sentry_dsn: str = "http://public@127.0.0.1:9/1") -> None:
    pem = PUBLIC_PEM.strip()
    path.write_text(
        f"CHATSYNC_DATABASE_URL={database_url}\n"
        f'CLERK_JWT_KEY="{pem}"\n'
        f"CLERK_ISSUER={ISSUER}\n"
        f"CLERK_AUTHORIZED_PARTIES={ORIGIN}\n"
        f"CLERK_WEBHOOK_SIGNING_SECRET={WEBHOOK_SECRET}\n"
        "CLERK_SECRET_KEY=sk_test_only_for_users_sync\n"
        "CHATSYNC_ADMIN_USER_IDS=user_admin\n"
        f"CHATSYNC_CORS_ORIGINS={FRONTEND}\n"
        f"SENTRY_DSN={sentry_dsn}\n"
        "CHATSYNC_LOG_FORMAT=json\n"
    )


def test_serve_runs_from_dotenv_and_logs_a_500_with_its_request_id_and_no_token(
    database_url: str, tmp_path: Path
) -> None:
    engine = open_engine(database_url)
    ensure_schema(engine)
    row = normalize_conversation(conversation("s1", "bot-a"), "bot-a", WhatsAppRule())
    with engine.begin() as connection:
        writes.upsert_conversations(connection, [row], datetime.now(UTC))
    sentry = fake_sentry()
    dsn, sent_to_sentry = sentry.__enter__()
    _dotenv(tmp_path / ".env", database_url, dsn)
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATSYNC_", "CLERK_", "CHATBASE_", "SENTRY_")) and k != "DATABASE_URL"
    }
    port = _free_port()
    log_path = tmp_path / "serve.log"
    admin = token(sub="user_admin")
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "chatsync", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_serving(base, server, log_path.read_text)
            with httpx.Client(base_url=base, timeout=10) as client:
                listed = client.get(
                    "/api/conversations",
                    params={"number": "91234567"},
                    headers={**bearer(admin), "x-request-id": "req-ok-1"},
                )
                assert listed.status_code == 200 and [c["id"] for c in listed.json()["data"]] == ["s1"]
                preflight = client.options(
                    "/api/conversations",
                    headers={"Origin": FRONTEND, "Access-Control-Request-Method": "GET"},
                )
                assert preflight.headers["access-control-allow-origin"] == FRONTEND  # CHATSYNC_CORS_ORIGINS
                body = json.dumps({"type": "user.created", "data": {"id": "user_w", "updated_at": 1}})
                signature = Webhook(WEBHOOK_SECRET).sign("msg_env", datetime.now(UTC), body)
                hook = client.post(
                    "/api/webhooks/clerk",
                    content=body,
                    headers={
                        "svix-id": "msg_env",
                        "svix-timestamp": str(int(time.time())),
                        "svix-signature": signature,
                    },
                )
                assert hook.status_code == 200, hook.text  # CLERK_WEBHOOK_SIGNING_SECRET

                with engine.begin() as connection:  # a 500 on purpose: the table is gone
                    connection.execute(
                        text(
                            "DROP TABLE conversations CASCADE"
                            if "postgres" in database_url
                            else "DROP TABLE conversations"
                        )
                    )
                broken = client.get(
                    "/api/conversations", headers={**bearer(admin), "x-request-id": "req-boom-1"}
                )
                assert broken.status_code == 500
                assert broken.json()["error"]["message"] == "unexpected error; request id req-boom-1"
        finally:
            server.terminate()
            server.wait(timeout=30)
            engine.dispose()
            sentry.__exit__(None, None, None)
    output = log_path.read_text()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # CHATSYNC_LOG_FORMAT=json
    assert all("request_id" in line and "level" in line for line in lines)
    failure = [line for line in lines if line["level"] == "ERROR"]
    assert failure and failure[0]["request_id"] == "req-boom-1" and "req-boom-1" in failure[0]["message"]
    assert "exc_info" in failure[0]  # the traceback, for the operator
    access = {line["request_id"]: line for line in lines if line["name"] == "chatsync.access"}
    assert access["req-ok-1"]["status"] == 200 and access["req-ok-1"]["user_id"] == "user_admin"
    assert access["req-ok-1"]["message"].startswith("GET /api/conversations?number ")
    assert access["req-boom-1"]["status"] == 500
    sent = b"\n".join(sent_to_sentry)  # SENTRY_DSN was read from .env too
    assert b"req-boom-1" in sent  # the 500 reached Sentry, with its request id
    assert admin.encode() not in sent and admin.split(".")[2].encode() not in sent  # and no token
    assert admin not in output and admin.split(".")[2] not in output  # no token, no signature
    assert "91234567" not in output  # no number from the query string


def test_text_logs_carry_the_request_id_on_every_line(engine: Any) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    kept = (root.handlers[:], root.level, logging.getLogger("chatsync").level)
    configure_logging("text", debug=False, stream=stream)
    try:
        client = TestClient(create_app(engine, api_settings(engine)), raise_server_exceptions=False)
        response = client.get("/api/conversations", headers={**bearer(token()), "x-request-id": "req-text-1"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "req-text-1"
        generated = client.get("/healthz").headers["x-request-id"]
    finally:
        root.handlers[:], _, _ = kept
        root.setLevel(kept[1])
        logging.getLogger("chatsync").setLevel(kept[2])
    lines = stream.getvalue().splitlines()
    assert any("INFO [req-text-1] chatsync.access: GET /api/conversations 200 " in line for line in lines)
    assert any(f"[{generated}] chatsync.access: GET /healthz 200" in line for line in lines)


def test_the_docs_recipe_for_trying_serve_without_clerk_works_as_written(tmp_path: Path) -> None:
    """docs/api.md's stand-in for a Clerk instance: its script, its settings, then a signed-in request."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = page.split("## Trying it without a Clerk instance", 1)[1].split("\n## ", 1)[0]
    script, shell = re.findall(r"```(?:python|sh)\n(.*?)```", section, flags=re.DOTALL)
    (tmp_path / "dev_clerk.py").write_text(script)
    subprocess.run([sys.executable, "dev_clerk.py"], cwd=tmp_path, check=True, timeout=60)
    assert "python dev_clerk.py" in shell
    exports = "\n".join(line for line in shell.splitlines() if line.startswith("export "))
    shown = subprocess.run(
        ["bash", "-c", f"{exports}\nenv -0"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    settings = dict(
        item.split("=", 1) for item in shown.split("\0") if item.startswith(("CLERK_", "CHATSYNC_"))
    )
    assert {"CLERK_JWT_KEY", "CLERK_ISSUER", "CLERK_AUTHORIZED_PARTIES", "CHATSYNC_ADMIN_USER_IDS"} <= set(
        settings
    )
    serve_line = next(line for line in shell.splitlines() if " serve " in line)
    assert "--port 8000" in serve_line and shlex.split(serve_line)[0] == "chatsync"

    database_url = f"sqlite:///{tmp_path / 'demo.db'}"
    engine = open_engine(database_url)
    ensure_schema(engine)
    row = normalize_conversation(conversation("d1", "demo-bot"), "demo-bot", WhatsAppRule())
    with engine.begin() as connection:
        writes.upsert_conversations(connection, [row], datetime.now(UTC))
    engine.dispose()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CHATSYNC_", "CLERK_", "CHATBASE_"))},
        **settings,
    }
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "chatsync", "--database-url", database_url, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_serving(base, server, lambda: server.stderr.read() if server.stderr else "")
        dev_token = (tmp_path / "dev-token").read_text().strip()
        listed = httpx.get(f"{base}/api/conversations", headers={"Authorization": f"Bearer {dev_token}"})
        assert listed.status_code == 200 and [c["id"] for c in listed.json()["data"]] == ["d1"]
        assert httpx.get(f"{base}/api/conversations").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=20)
