"""The events outbox in PostgreSQL (table ``event_outbox``, migration 005).

Guarantees:
- ``append`` runs inside the caller's transaction: the events exist if and only if what
  they describe was committed (no event for a rolled-back message, none lost for a
  committed one).
- ``claim`` leases the oldest pending events to one caller for ``lease_s``; of concurrent
  callers each gets different rows (claims are serialised by an advisory lock and rows
  are taken ``FOR UPDATE SKIP LOCKED``). A key that has a row leased elsewhere is skipped
  as a whole, so one key's events are published by one relay at a time, in ``id`` order
  (which, for one chat, is commit order: its writers hold the chat's row lock).
- ``mark_published`` removes rows: call it only after the broker acknowledged them. A row
  whose relay died comes back when its lease runs out (at-least-once: it may be
  published twice, with the same ``eventId``).
- ``release`` hands rows back before their lease ends, optionally after a delay (the
  relay's backoff while the broker is down; the delay keeps their keys skipped too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from adapters.kafka_events import Event

CLAIM_LOCK = 0x65766E74  # "evnt": serialises claims so "key leased elsewhere" is exact


@dataclass(frozen=True, slots=True)
class PendingEvent:
    id: int
    event_id: str
    key: str
    value: bytes

    @property
    def record(self) -> tuple[str, bytes]:
        return self.key, self.value


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    oldest_age_s: float


async def append(conn: asyncpg.Connection, events: Sequence[Event]) -> None:
    """Add events inside the caller's open transaction, in the order given."""
    if not events:
        return
    await conn.execute(
        "INSERT INTO event_outbox(event_id, key, value)"
        " SELECT e, k, v FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY"
        " AS t(e, k, v, n) ORDER BY n",
        [e.event_id for e in events], [e.key for e in events],
        [e.encode().decode() for e in events])


class EventOutbox:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(self, limit: int, lease_s: float) -> list[PendingEvent]:
        """Up to ``limit`` pending events in ``id`` order, leased for ``lease_s``."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK)
            rows = await conn.fetch(
                """
                WITH picked AS (
                    SELECT id FROM event_outbox e
                     WHERE (e.leased_until IS NULL OR e.leased_until <= now())
                       AND NOT EXISTS (SELECT 1 FROM event_outbox b WHERE b.key = e.key
                                        AND b.leased_until > now())
                     ORDER BY id LIMIT $1
                     FOR UPDATE SKIP LOCKED
                )
                UPDATE event_outbox o
                   SET leased_until = now() + make_interval(secs => $2::float8),
                       attempts = o.attempts + 1
                  FROM picked WHERE o.id = picked.id
                RETURNING o.id, o.event_id, o.key, o.value
                """,
                limit, float(lease_s))
        return sorted((PendingEvent(r["id"], r["event_id"], r["key"], r["value"].encode())
                       for r in rows), key=lambda p: p.id)

    async def mark_published(self, ids: Sequence[int]) -> None:
        """The broker acknowledged these: remove them (a repeat is a no-op)."""
        if ids:
            await self.pool.execute("DELETE FROM event_outbox WHERE id = ANY($1::bigint[])", list(ids))

    async def release(self, ids: Sequence[int], delay_s: float = 0.0) -> None:
        """Give leased rows back: claimable again after ``delay_s``."""
        if ids:
            await self.pool.execute(
                "UPDATE event_outbox SET leased_until = CASE WHEN $2::float8 > 0 THEN"
                " now() + make_interval(secs => $2::float8) END WHERE id = ANY($1::bigint[])",
                list(ids), float(delay_s))

    async def stats(self) -> OutboxStats:
        """Events not yet published, and the age in seconds of the oldest of them."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age"
            " FROM event_outbox")
        assert row is not None
        return OutboxStats(int(row["n"]), float(row["age"]))
