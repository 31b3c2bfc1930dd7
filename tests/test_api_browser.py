"""A real browser (the system's headless Chromium, driven by Playwright) uses the API from another origin.

The page (tests/browser/page.html) is served from a second origin on 127.0.0.1; it lists conversations
with a Bearer token, corrects a number and receives the matching ``conversation.upserted`` on the event
stream. The same page on an origin the API does not allow is blocked by the browser's CORS check.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from chatsync.config import WhatsAppRule
from chatsync.normalize import normalize_conversation
from chatsync.store import writes
from chatsync.web.app import create_app
from tests.api_helpers import api_settings, conversation, running_server, token
from tests.conftest import UNDER_CI

PAGES = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHATSYNC_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _browser_or_skip() -> Any:
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "Playwright for Python is not installed (pip install -e '.[dev]')"
    if problem is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if UNDER_CI:
            pytest.fail(f"{problem}; CI must run the browser test")
        pytest.skip(problem)
    return sync_playwright


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on a free loopback port: a second origin for the page."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_the_frontends_origin_lists_corrects_and_hears_the_change(engine: Any) -> None:
    sync_playwright = _browser_or_skip()
    rows = [
        normalize_conversation(conversation(cid, "bot-a"), "bot-a", WhatsAppRule()) for cid in ("w1", "w2")
    ]
    with engine.begin() as connection:
        writes.upsert_conversations(connection, rows, datetime.now(UTC))
    bearer_token = token(sub="user_admin")
    with static_site(PAGES) as frontend, static_site(PAGES) as stranger:
        app = create_app(engine, api_settings(engine, cors_origins=(frontend,)))
        with running_server(app) as api, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"{frontend}/page.html#api={api}&token={bearer_token}")
                page.wait_for_function("window.results && window.results.done", timeout=30_000)
                results = page.evaluate("window.results")

                blocked = browser.new_page()
                blocked.goto(f"{stranger}/page.html#api={api}&token={bearer_token}")
                blocked.wait_for_function("window.results && window.results.done", timeout=30_000)
                refused = blocked.evaluate("window.results")
            finally:
                browser.close()
    assert "error" not in results, results
    assert results["listStatus"] == 200 and results["ids"] == ["w2", "w1"]
    assert results["requestId"]  # x-request-id is exposed to the page
    assert results["streamStatus"] == 200
    assert results["updateStatus"] == 200 and results["stored"] == "+85261234567"
    assert results["event"]["data"]["id"] == "w2" and int(results["event"]["id"]) > 0
    # the same page on an origin the API does not allow: the browser refuses to hand it the response
    assert "ids" not in refused and "Failed to fetch" in refused["error"]
