"""The OpenAPI document as a real frontend toolchain reads it: openapi-typescript generates the types and
tsc type-checks a small client (tests/typescript/client.ts) against them.

The npm packages are pinned in tests/typescript/package-lock.json; ``npm ci --prefix tests/typescript``
installs them (``.ci/run`` does). Without them the test skips, except under CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from chatsync.web.app import create_app
from tests.api_helpers import api_settings
from tests.conftest import UNDER_CI

PROJECT = Path(__file__).parent / "typescript"
BIN = PROJECT / "node_modules" / ".bin"


def _tools() -> tuple[Path, Path]:
    generate, tsc = BIN / "openapi-typescript", BIN / "tsc"
    if not (shutil.which("node") and generate.exists() and tsc.exists()):
        reason = "node and the pinned npm packages are needed: npm ci --prefix tests/typescript"
        if UNDER_CI:
            pytest.fail(f"{reason} (CI must run this test)")
        pytest.skip(reason)
    return generate, tsc


def test_typescript_types_generated_from_openapi_type_check_a_client(sqlite_url: str, tmp_path: Path) -> None:
    from chatsync.store.engine import open_engine

    generate, tsc = _tools()
    engine = open_engine(sqlite_url)  # the document does not depend on the database
    document = create_app(engine, api_settings(engine)).openapi()
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    for name in ("client.ts", "tsconfig.json"):
        shutil.copy(PROJECT / name, tmp_path / name)
    generated = subprocess.run(
        [str(generate), "openapi.json", "--output", "api.d.ts"], cwd=tmp_path, capture_output=True, text=True
    )
    assert generated.returncode == 0, generated.stderr
    types = (tmp_path / "api.d.ts").read_text()
    assert '"/api/events"' in types and "ConversationUpserted" in types
    checked = subprocess.run([str(tsc), "-p", "tsconfig.json"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
