"""What chatsync's sync is compared with: the floor (a bare httpx loop) and a dlt rest_api pipeline."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx


def floor_seconds(base_url: str) -> tuple[float, int]:
    """Fetch and JSON-decode every page, throw it away: no database, no rules. (seconds, conversations)"""
    started = time.perf_counter()
    total = 0
    with httpx.Client(
        base_url=base_url + "/", headers={"Authorization": "Bearer demo-key"}, timeout=60
    ) as http:
        page = 1
        while True:
            data = http.get(
                "get-conversations", params={"chatbotId": "demo-bot", "page": page, "size": 100}
            ).json()["data"]
            total += len(data)
            if len(data) < 100:
                break
            page += 1
    return time.perf_counter() - started, total


def dlt_seconds(base_url: str, database_url: str) -> tuple[float, int]:
    """A dlt rest_api pipeline loading the same pages into the same database. (seconds, rows loaded)"""
    import dlt
    from dlt.sources.helpers.rest_client.paginators import PageNumberPaginator
    from dlt.sources.rest_api import rest_api_source

    workdir = Path(tempfile.mkdtemp(prefix="chatsync-bench-dlt-"))
    os.environ["DLT_DATA_DIR"] = str(workdir)
    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"
    try:
        source = rest_api_source(
            {
                "client": {
                    "base_url": base_url + "/",
                    "auth": {"type": "bearer", "token": "demo-key"},
                    "paginator": PageNumberPaginator(
                        base_page=1, page_param="page", total_path=None, stop_after_empty_page=True
                    ),
                },
                "resources": [
                    {
                        "name": "conversations",
                        "primary_key": "id",
                        "write_disposition": "merge",
                        "endpoint": {
                            "path": "get-conversations",
                            "params": {"chatbotId": "demo-bot", "size": 100},
                            "data_selector": "data",
                        },
                        "columns": {"messages": {"data_type": "json"}},
                    }
                ],
            }
        )
        pipeline = dlt.pipeline(
            pipeline_name="chatsync_bench",
            destination=dlt.destinations.sqlalchemy(credentials=database_url),
            dataset_name="dlt_peer",
            pipelines_dir=str(workdir / "pipelines"),
        )
        started = time.perf_counter()
        info = pipeline.run(source)
        seconds = time.perf_counter() - started
        normalized = pipeline.last_trace.last_normalize_info if pipeline.last_trace else None
        rows = normalized.row_counts.get("conversations", 0) if normalized else 0
        del info
        return seconds, int(rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
