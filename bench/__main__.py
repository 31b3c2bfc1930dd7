"""Run S1–S8 against SQLite and PostgreSQL, print figure / target / met, write the figures to JSON.

    python -m bench            the sizes of docs/benchmarks.md (about half an hour on 2 cores)
    python -m bench --quick    every workload at a tenth of the size, for CI

Every comparison is a ratio measured in the same run; absolute times are printed for the record.
Nothing here asserts: a target not met is printed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import fresh_database, machine
from bench.workloads import (
    s1_rate_limit,
    s2_s4_speed,
    s3_from_s2,
    s3_memory,
    s5_s6_queries,
    s7_http,
    s8_extraction,
    s9_startup,
    seed_in_parallel,
)

FULL = {
    "S1": 20_000,
    "S1_v2": 10_000,
    "S2": 100_000,
    "S2_small": 10_000,
    "S3": (20_000, 200_000),
    "S5": 1_000_000,
    "S7_seconds": 20,
    "S8": 100_000,
}


def sizes(quick: bool) -> dict[str, Any]:
    if not quick:
        return FULL
    return {
        "S1": 2_000,
        "S1_v2": 1_000,
        "S2": 10_000,
        "S2_small": 1_000,
        "S3": (2_000, 20_000),  # (with S2: measured on S2's 1,000 and 10,000)
        "S5": 100_000,
        "S7_seconds": 2,
        "S8": 10_000,
    }


def _s1_rows(key: str, per_db: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, str, bool | None]] = []
    name = "S1 (API v2)" if key == "S1_v2" else "S1"
    for db, f in per_db.items():
        rows.append(
            (
                name,
                db,
                f"{f['conversations_per_s']:,} conv/s = {f['ceiling_share']:.0%} of ceiling "
                f"({f['seconds']} s = {f['over_minimum']}× the {f['minimum_seconds']} s minimum; "
                f"{f['requests']} requests, minimum {f['minimum_requests']})",
                "≥ 95 %",
                f["ceiling_share"] >= 0.95,
            )
        )
        rows.append((name, db, f"{f['http_429']} × 429", "0", f["http_429"] == 0))
    return rows


def targets(figures: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """(workload, database, figure, target, met) rows for the table."""
    rows: list[tuple[str, str, str, str, bool | None]] = []
    for key in ("S1", "S1_v2"):
        rows.extend(_s1_rows(key, figures.get(key, {})))
    for db, f in figures.get("S2", {}).items():
        rows.append(
            (
                "S2",
                db,
                f"{f['seconds']} s ÷ floor {f['floor_seconds']} s = {f['floor_ratio']}",
                "≤ 1.5",
                f["floor_ratio"] <= 1.5,
            )
        )
        rows.append(
            (
                "S2",
                db,
                f"dlt {f['dlt_seconds']} s: chatsync {f['times_faster_than_dlt']}× as fast",
                "≥ 2×",
                f["times_faster_than_dlt"] >= 2,
            )
        )
        rows.append(
            (
                "S2",
                db,
                f"{f['ms_per_conversation']} ms/conversation at {f['conversations']:,} ÷ "
                f"{f['ms_per_conversation_small']} at {f['small']:,} = {f['growth_per_conversation']}",
                "≤ 1.1",
                f["growth_per_conversation"] <= 1.1,
            )
        )
    for db, f in figures.get("S3", {}).items():
        rows.append(
            (
                "S3",
                db,
                f"peak {f['peak_rss_mb_small']} MB at {f['small']:,} / {f['peak_rss_mb_large']} MB at "
                f"{f['large']:,} (with its workers)",
                "≤ 200 MB",
                max(f["peak_rss_mb_small"], f["peak_rss_mb_large"]) <= 200,
            )
        )
        rows.append(("S3", db, f"growth {f['growth']}×", "≤ 1.2×", f["growth"] <= 1.2))
    for db, f in figures.get("S4", {}).items():
        rows.append(
            (
                "S4",
                db,
                f"{f['seconds']} s = {f['share_of_S2']:.1%} of S2, {f['requests']} requests",
                "≤ 5 %",
                f["share_of_S2"] <= 0.05,
            )
        )
    for db, f in figures.get("S5", {}).items():
        limit = 2.0 if db == "postgres" else 4.0
        rows.append(
            (
                "S5",
                db,
                f"report {f['report_all_s']} s ({f['all_over_count']}× count; {f['users']:,} users)",
                f"≤ {limit:g} s",
                f["report_all_s"] <= limit,
            )
        )
        rows.append(("S5", db, f"one month {f['report_month_s']} s", "< all", f["month_faster"]))
    for db, f in figures.get("S6", {}).items():
        for key in ("list_number_ms", "list_has_whatsapp_ms", "show_ms"):
            rows.append(("S6", db, f"{key.removesuffix('_ms')} {f[key]} ms", "≤ 50 ms", f[key] <= 50))
        if f.get("plans_use_indexes"):
            rows.append(
                (
                    "S6",
                    db,
                    f"index plans {f['plans_use_indexes']}",
                    "all",
                    all(f["plans_use_indexes"].values()),
                )
            )
    for db, f in figures.get("S7", {}).items():
        rows.append(
            (
                "S7",
                db,
                f"{f['requests_per_s']} req/s, p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, "
                f"{f['errors']} errors",
                "≥ 400/s, p99 ≤ 150 ms, 0 errors",
                f["requests_per_s"] >= 400 and f["p99_ms"] <= 150 and f["errors"] == 0,
            )
        )
    if "S8" in figures:
        f = figures["S8"]
        rows.append(
            ("S8", "-", f"{f['replies_per_s']:,} replies/s", "≥ 20,000/s", f["replies_per_s"] >= 20_000)
        )
    if "S9" in figures:
        f = figures["S9"]
        for name, limit in (("list", 0.5), ("show", 0.5), ("set_whatsapp", 0.5), ("extract_test", 0.3)):
            value = f[f"{name}_cpu_s"]
            rows.append(
                (
                    "S9",
                    "sqlite",
                    f"{name.replace('_', '-')} {value} s CPU (python -c pass {f['python_pass_cpu_s']} s)",
                    f"≤ {limit} s",
                    value <= limit,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the size, for CI")
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--only", default="S1,S2,S3,S4,S5,S6,S7,S8,S9", help="workloads to run")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results[-quick].json)")
    args = parser.parse_args(argv)
    size = sizes(args.quick)
    only = set(args.only.upper().split(","))
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    out = Path(args.out or Path(__file__).parent / ("results-quick.json" if args.quick else "results.json"))
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chatsync-bench-") as tmp:
        workdir = Path(tmp)
        if "S1" in only:
            for db in databases:
                _step(f"S1 {db}")
                figures.setdefault("S1", {})[db] = s1_rate_limit(size["S1"], db, workdir)
            # API v2 pages the same database code as v1; quick runs it on one database to stay in budget.
            for db in databases[:1] if args.quick else databases:
                _step(f"S1 API v2 {db}")
                figures.setdefault("S1_v2", {})[db] = s1_rate_limit(size["S1_v2"], db, workdir, "v2")
        if only & {"S2", "S4"}:
            _step(f"S2/S4 {', '.join(databases)}")
            for db, both in s2_s4_speed(size["S2"], size["S2_small"], databases, workdir).items():
                figures.setdefault("S2", {})[db] = both["S2"]
                figures.setdefault("S4", {})[db] = both["S4"]
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(1) as beside:
            # S3 measures memory, which other work beside it does not change: its syncs run while the
            # databases of S5-S7 are seeded (which is not measured), and the databases seed in parallel.
            # Every timed workload runs alone.
            memory = None
            if "S3" in only and args.quick and "S2" in figures:
                # quick: S2's own syncs at its two sizes (a tenfold history, as S3's) give the memory figures
                figures["S3"] = s3_from_s2(figures["S2"])
            elif "S3" in only:
                _step(f"S3 {', '.join(databases)} (beside the seeding)")
                small, large = size["S3"]
                memory = beside.submit(s3_memory, small, large, databases, workdir)
            urls: dict[str, str] = {}
            if only & {"S5", "S6", "S7"}:
                urls = {db: stack.enter_context(fresh_database(db, workdir)) for db in databases}
                _step(f"seeding {size['S5']:,} conversations into {', '.join(databases)}")
                figures["seed"] = seed_in_parallel(urls, size["S5"])
            if memory is not None:
                figures["S3"] = memory.result()
            for db, url in urls.items():
                if only & {"S5", "S6"}:
                    _step(f"S5/S6 {db}")
                    both = s5_s6_queries(url)
                    figures.setdefault("S5", {})[db] = both["S5"]
                    figures.setdefault("S6", {})[db] = both["S6"]
                if "S7" in only and db == "postgres":
                    _step("S7 postgres")
                    figures.setdefault("S7", {})[db] = s7_http(url, size["S7_seconds"], 32, workdir)
        if "S8" in only:
            _step("S8")
            figures["S8"] = s8_extraction(size["S8"])
        if "S9" in only:
            _step("S9")
            figures["S9"] = s9_startup(workdir, repeat=3 if args.quick else 5)
    rows = targets(figures)
    result = {
        "machine": machine(),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": figures,
        "targets": [
            {"workload": w, "database": d, "figure": f, "target": t, "met": m} for w, d, f, t, m in rows
        ],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, rows)
    print(f"\nfigures written to {out}")
    return 0


_STARTED = time.perf_counter()


def _step(what: str) -> None:
    """Progress on stderr, with the time so far: where a slow run spends it shows in CI's log."""
    print(f"… {what} (at {time.perf_counter() - _STARTED:.0f} s)", file=sys.stderr, flush=True)


def _print_table(result: dict[str, Any], rows: list[tuple[str, str, str, str, bool | None]]) -> None:
    m = result["machine"]
    print(
        f"chatsync benchmark{' (quick)' if result['quick'] else ''}: {m['cores']} cores, Python {m['python']}, "
        f"SQLite {m['sqlite']}, PostgreSQL {m['postgresql']}; {result['seconds']} s"
    )
    print()
    print("| id | db | figure | target | met |\n|---|---|---|---|---|")
    for workload, db, figure, target, met in rows:
        print(f"| {workload} | {db} | {figure} | {target} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
