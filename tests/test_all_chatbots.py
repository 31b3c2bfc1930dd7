"""`sync --all-chatbots`: discover the account's chatbots, and let several hosts share them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from chatsync.store.engine import open_engine
from chatsync.store.tables import sync_runs
from chatsync.sync import ROUND_GRACE
from tests.conftest import chatbase_env
from tests.helpers import assert_exact

BOTS = tuple(f"bot-{i:02d}" for i in range(12))


@pytest.mark.parametrize("shape", ["list", "data"])
def test_all_chatbots_syncs_every_chatbot_get_chatbots_names(
    cli: Any, emulator_factory: Any, sqlite_url: str, shape: str
) -> None:
    server = emulator_factory(
        conversations=60, seed=61, chatbot_ids=("bot-a", "bot-b", "bot-c"), chatbots_shape=shape
    )
    env = {**chatbase_env(server, sqlite_url), "CHATBASE_CHATBOT_ID": ""}
    result = cli("sync", "--all-chatbots", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["chatbots"] == ["bot-a", "bot-b", "bot-c"] and summary["inserted"] == 180
    for bot in ("bot-a", "bot-b", "bot-c"):
        assert_exact(sqlite_url, server.emulator, bot)
    # at once again: the same round (hosts start seconds apart), so nothing is synced twice
    again = json.loads(cli("sync", "--all-chatbots", "--json", env=env).stdout)
    assert again["chatbots"] == [] and again["skipped"] == ["bot-a", "bot-b", "bot-c"]
    time.sleep(ROUND_GRACE.total_seconds())
    later = json.loads(cli("sync", "--all-chatbots", "--json", env=env).stdout)  # the next round
    assert later["chatbots"] == ["bot-a", "bot-b", "bot-c"] and later["inserted"] == 0


def test_all_chatbots_and_chatbot_id_together_is_a_usage_error(cli: Any, sqlite_url: str) -> None:
    result = cli("sync", "--all-chatbots", "--chatbot-id", "x", "--json", env={"CHATBASE_API_KEY": "k"})
    assert result.exit_code == 2 and "not both" in result.stderr


@pytest.mark.postgres
def test_three_hosts_share_twelve_chatbots_each_synced_once_per_round(
    emulator_factory: Any, postgres_url: str, tmp_path: Path
) -> None:
    """Three cron hosts start `sync --all-chatbots` together against one PostgreSQL."""
    server = emulator_factory(conversations=250, seed=62, chatbot_ids=BOTS, latency_ms=40)
    env = {
        **os.environ,
        **chatbase_env(server, postgres_url),
        "CHATBASE_CHATBOT_ID": "",
        "CHATSYNC_CONCURRENCY": "2",
    }
    assert (
        subprocess.run([sys.executable, "-m", "chatsync", "db", "upgrade"], env=env, check=False).returncode
        == 0
    )

    def round_of_three() -> list[dict[str, Any]]:
        hosts = [
            subprocess.Popen(
                [sys.executable, "-m", "chatsync", "sync", "--all-chatbots", "--json"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        lines = []
        for host in hosts:
            out, err = host.communicate(timeout=300)
            assert host.returncode == 0, err
            lines.append(json.loads(out))
        return lines

    first = round_of_three()
    synced = [bot for line in first for bot in line["chatbots"]]
    assert sorted(synced) == list(BOTS)  # every chatbot once, by exactly one host
    assert sum(line["inserted"] for line in first) == 250 * len(BOTS)
    assert sum(line["fetched"] for line in first) == 250 * len(BOTS)  # nothing fetched twice
    assert sum(1 for line in first if line["chatbots"]) >= 2  # the work really was shared
    for line in first:
        assert sorted(line["chatbots"] + line.get("skipped", [])) == list(BOTS)
    for bot in BOTS:
        assert_exact(postgres_url, server.emulator, bot)

    # each chatbot's syncs never overlapped: the runs that took a chatbot did so one after another
    engine = open_engine(postgres_url)
    with engine.connect() as connection:
        runs = connection.execute(select(sync_runs.c.chatbot_ids, sync_runs.c.status)).all()
    engine.dispose()
    assert len(runs) == 3 and all(status == "ok" for _, status in runs)
    taken = [bot for ids, _ in runs for bot in ids]
    assert len(taken) == len(set(taken)) == len(BOTS)

    time.sleep(ROUND_GRACE.total_seconds())
    second = round_of_three()  # the next cron round syncs each once again
    assert sorted(bot for line in second for bot in line["chatbots"]) == list(BOTS)
    assert sum(line["inserted"] for line in second) == 0
