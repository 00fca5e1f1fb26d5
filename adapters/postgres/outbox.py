"""The delivery outbox: entries written with each persisted batch, removed once its
messages were handed to delivery; the relay claims what the fast path left behind."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from adapters.postgres.rows import MESSAGE_COLUMNS, message_of
from stages.ports import StoredMessage


class PostgresOutbox:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def done(self, outbox_ids: Sequence[int]) -> None:
        await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(outbox_ids))

    async def claim(self, grace_s: float, limit: int, lease_s: float = 30.0
                           ) -> list[tuple[int, list[StoredMessage]]]:
        """Entries the fast path left behind, leased to this caller for ``lease_s``."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, chat_id, from_seq, to_seq FROM outbox"
                    " WHERE available_at < now() - make_interval(secs => $1)"
                    " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    grace_s,
                    limit,
                )
                if not rows:
                    return []
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1,"
                    " available_at = now() + make_interval(secs => $2) WHERE id = ANY($1::bigint[])",
                    [r["id"] for r in rows],
                    lease_s,
                )
            out = []
            for r in rows:
                msgs = await conn.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1"
                    " AND seq BETWEEN $2 AND $3 ORDER BY seq",
                    r["chat_id"], r["from_seq"], r["to_seq"],
                )
                out.append((r["id"], [message_of(m) for m in msgs]))
            return out

    async def stats(self) -> tuple[int, float]:
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age"
            " FROM outbox"
        )
        assert row is not None
        return int(row["n"]), float(row["age"])
