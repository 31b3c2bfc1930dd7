"""The documentation says what the code does: every command and option in docs/cli.md, no dead links."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from chatsync.cli import app
from tests.test_cli_misc import _commands

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def _section_for(path: tuple[str, ...], sections: dict[str, str]) -> str:
    for heading, body in sections.items():
        words = heading.split()
        if words[:2] != ["chatsync", path[0]]:
            continue
        if len(path) == 1 or f"chatsync {' '.join(path)}" in body:
            return body
    raise AssertionError(f"docs/cli.md has no section for chatsync {' '.join(path)}")


def test_every_command_and_option_is_in_docs_cli(cli: Any) -> None:
    sections = _sections((ROOT / "docs" / "cli.md").read_text())
    for path, _ in _commands(app):
        body = _section_for(path, sections)
        help_text = cli(*path, "--help").stdout
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", help_text)) - {"--help"}
        missing = sorted(o for o in options if o not in body)
        assert not missing, f"docs/cli.md, chatsync {' '.join(path)}: {', '.join(missing)} not described"


def test_global_options_are_in_docs_cli(cli: Any) -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", cli("--help").stdout)) - {"--help"}
    assert not sorted(o for o in options if o not in text)


def test_links_between_pages_point_at_files_of_the_repository() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            assert resolved.exists(), f"{page.name} links to a missing file: {target}"


def test_every_setting_is_described_in_docs_configuration() -> None:
    from chatsync.config import SETTINGS

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [s.env[0] for s in SETTINGS if f"`{s.env[0]}`" not in text]
    assert not missing, f"docs/configuration.md does not describe {', '.join(missing)}"
