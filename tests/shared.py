"""Where the project's shared specs live: ../shared beside the checkout (CHATSYNC_SHARED overrides)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("CHATSYNC_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing: CI must run with shared/ beside the checkout")
        pytest.skip(f"{path} not found: set CHATSYNC_SHARED to the shared/ folder")
    return path
