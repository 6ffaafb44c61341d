"""Shared set-up for the benchmarks: a scratch PostgreSQL database and Redis database, settings,
worker processes, and a description of the machine for the tables."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import secrets
from pathlib import Path

from dermascan.config import Settings
from tests.services import HAM, Worker, free_port  # noqa: F401  (re-exported)
from tests.services import scratch_postgres as _scratch_postgres

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"


def scratch_postgres():
    return _scratch_postgres("dermascan_bench")


def redis_url(db: int = 12) -> str:
    import redis

    redis.Redis("127.0.0.1", 6379, db=db).flushdb()
    return f"redis://127.0.0.1:6379/{db}"


def settings(data_dir: Path, database_url: str, broker_url: str, bundle: Path, **overrides) -> Settings:
    values = dict(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        model_bundle=bundle,
        secret_key=secrets.token_hex(16),
        tta=False,
    )
    values.update(overrides)
    return Settings.from_env(env={}, **values)


def table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])
