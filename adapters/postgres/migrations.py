"""Schema migrations: numbered SQL files in ``sql/``, applied once under an advisory lock.

The composition root applies them once per deploy (``build_app``), and operators can run
them by hand (``conveyor migrate``). Replicas only check that the schema is current
(``require_current``): a replica never changes the schema while others serve.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("conveyor.postgres")
SQL_DIR = Path(__file__).with_name("sql")
MIGRATION_LOCK = 0x636F6E76  # "conv"


class SchemaOutdated(RuntimeError):
    """The database lacks migrations this code needs: run ``conveyor migrate``."""


def known_versions(sql_dir: Path = SQL_DIR) -> list[str]:
    return [p.stem for p in sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))]


async def migrate(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the numbered SQL files not applied yet, each in its own transaction, under an
    advisory lock, so two deploys (or a deploy and ``conveyor migrate``) do not race.
    Idempotent: returns the versions applied by this call (none on a repeat)."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version in known_versions(sql_dir):
                if version in done:
                    continue
                path = sql_dir / f"{version}.sql"
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations(version) VALUES ($1)", path.stem)
                applied_now.append(path.stem)
                log.info("applied migration %s", path.stem)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def require_current(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> None:
    """Raise ``SchemaOutdated`` unless every migration of ``sql_dir`` was applied."""
    try:
        rows = await pool.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []
    missing = sorted(set(known_versions(sql_dir)) - {r["version"] for r in rows})
    if missing:
        raise SchemaOutdated(f"database schema lacks migrations {missing}: run `conveyor migrate`"
                             " (or redeploy: the app applies them when it is built)")
