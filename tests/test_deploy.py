"""The deployment examples of docs/deploy.md work as written: the systemd units, the Dockerfile, the cron line."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UNDER_CI, chatbase_env

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = "/opt/chatsync/.venv/bin/chatsync"


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if UNDER_CI:
            pytest.fail(f"{tool} is missing: .ci/run must install it")
        pytest.skip(f"{tool} is not installed")
    return found


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _require("systemd-analyze")
    chatsync = Path(sys.executable).with_name("chatsync")
    service = (ROOT / "deploy" / "chatsync-sync.service").read_text()
    assert INSTALLED in service and "SuccessExitStatus=75" in service
    (tmp_path / "chatsync-sync.service").write_text(service.replace(INSTALLED, str(chatsync)))
    shutil.copy(ROOT / "deploy" / "chatsync-sync.timer", tmp_path)
    checked = subprocess.run(
        [analyze, "verify", "chatsync-sync.service", "chatsync-sync.timer"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "chatsync-sync" not in checked.stderr  # no warning about our units either

    broken = service.replace(INSTALLED, "/nonexistent/chatsync")  # the check can fail
    (tmp_path / "chatsync-sync.service").write_text(broken)
    refused = subprocess.run(
        [analyze, "verify", "chatsync-sync.service"], cwd=tmp_path, capture_output=True, check=False
    )
    assert refused.returncode != 0


def _dockerfile() -> tuple[list[str], list[str]]:
    """The Dockerfile's pip install command and ENTRYPOINT + CMD."""
    text = (ROOT / "Dockerfile").read_text()
    (run,) = re.findall(r"^RUN (pip install .+?)(?: && .*)?$", text, re.MULTILINE)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    command = json.loads(re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return shlex.split(run), [*entrypoint, *command]


def test_the_dockerfile_installs_chatsync_and_its_default_command_syncs(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """No Docker engine here: run the image's install and default command in a fresh virtualenv."""
    install, command = _dockerfile()
    assert install[:2] == ["pip", "install"] and command == ["chatsync", "sync", "--json"]
    image = tmp_path / "image"
    venv.create(image, with_pip=True)
    target = [str(ROOT) + arg.removeprefix("/src") if arg.startswith("/src") else arg for arg in install[2:]]
    built = subprocess.run(
        [str(image / "bin" / "pip"), "install", "-q", *target], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr[-2000:]
    home = tmp_path / "home"
    home.mkdir()
    server = emulator_factory(conversations=120, seed=71)
    env = {
        "PATH": f"{image / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        **chatbase_env(server, f"sqlite:///{home / 'chatsync.db'}"),
    }
    ran = subprocess.run(
        [str(image / "bin" / command[0]), *command[1:]],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    line = json.loads(ran.stdout)
    assert (line["status"], line["inserted"]) == ("ok", 120)
    report = subprocess.run(
        [str(image / "bin" / "chatsync"), "report", "--format", "json"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )  # the migrations ship inside the installed package
    assert report.returncode == 0 and json.loads(report.stdout)["conversations"] == 120


def _cron_lines() -> list[str]:
    lines = []
    for page in (ROOT / "README.md", ROOT / "docs" / "deploy.md"):
        found = re.findall(r"^\*/15 \* \* \* \*\s+(.+)$", page.read_text(), re.MULTILINE)
        assert found, f"{page.name} has no cron line"
        lines.extend(found)
    assert len(set(lines)) == 1, "README and docs/deploy.md show the same cron line"
    return lines[:1]


def test_the_cron_line_logs_one_json_line_per_run_and_nothing_else(
    emulator_factory: Any, tmp_path: Path
) -> None:
    (command,) = _cron_lines()
    site = tmp_path / "srv-chatsync"
    (site / ".venv").mkdir(parents=True)
    (site / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    server = emulator_factory(conversations=90, seed=72)
    dotenv = chatbase_env(server, f"sqlite:///{site / 'chatsync.db'}")
    (site / ".env").write_text(
        "".join(f"{k}={v}\n" for k, v in dotenv.items())
    )  # settings from .env, as documented
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for _ in range(2):
        done = subprocess.run(["sh", "-c", command.replace("/srv/chatsync", str(site))], env=env, check=False)
        assert done.returncode == 0
    runs = [json.loads(line) for line in (site / "sync.log").read_text().splitlines()]
    assert [r["status"] for r in runs] == ["ok", "ok"] and runs[0]["inserted"] == 90
    assert (site / "sync.err").read_text() == ""
