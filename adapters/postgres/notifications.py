"""PostgreSQL store of the notification route (implements ``NotificationStore``).

- ``accept``: notifications and their outbox rows in one transaction.
- ``claim_*``: due outbox rows, leased with ``FOR UPDATE SKIP LOCKED`` so that concurrent
  dispatchers never take the same row; a lease that expires (the process died) makes the
  row claimable again, so nothing accepted is lost (delivery is at-least-once).
- ``record_delivered``: one delivered send, committed as it completes (the contact marked
  delivered in the notification's progress, the attempt stored), so a dispatcher that dies
  mid-round leaves every delivery it made recorded but those in flight; the next claim
  sends to nobody recorded delivered.
- ``finish_round``: a round's attempts, the new per-contact progress and either the next
  due time or the final state, in one transaction; a contact recorded delivered stays
  delivered and an attempt already recorded is not stored twice.
- idempotency keys per (subject, key) with a TTL. A request claims its key
  (``idempotency_begin``); ``accept`` marks the key done with the request's response in the
  transaction that stores the notifications, so a repeat after that commit replays the
  response whatever happens to the request afterwards (crash, cancellation, a lost reply).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from adapters import event_outbox
from adapters.kafka_events import attempt_event, notification_event, round_events
from stages.notifications import (
    Attempt,
    ContactProgress,
    ContactStatus,
    FinalState,
    IdempotencyClaim,
    IdempotencyLost,
    IdempotencyRecord,
    Job,
    NotificationDraft,
    RoundResult,
    SendStatus,
    adopt_recorded,
    rfc3339_ms,
)

_CLAIM_COLUMNS = """
    n.id::text AS id, n.contacts, n.message, n.strategy, n.subject_name, n.progress, o.round
"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _ts(value: datetime | None) -> str | None:
    return rfc3339_ms(value.timestamp()) if value is not None else None


def _progress(value: Any) -> list[ContactProgress]:
    return [ContactProgress.from_json(p) for p in _json(value) or []]


# An attempt row, unless it is a delivery already stored (the same contact and attempt):
# ``record_delivered`` stored it as it happened, ``finish_round`` comes back with it.
_INSERT_ATTEMPT = """
    INSERT INTO notification_attempts(notification_id, contact_index, channel, attempt, status,
                                      detail, duration_ms)
    SELECT $1::uuid, $2, $3, $4, $5, $6, $7
     WHERE $5 <> 'delivered' OR NOT EXISTS (
           SELECT 1 FROM notification_attempts
            WHERE notification_id = $1::uuid AND contact_index = $2 AND attempt = $4
              AND status = 'delivered')
"""


# Marks contact $2 delivered unless it is already, and stores the attempt unless stored:
# one statement, so one round trip and its own transaction.
_RECORD_DELIVERED = """
    WITH marked AS (
        UPDATE notifications
           SET progress = jsonb_set(progress, ARRAY[($2::int)::text], $7::jsonb),
               updated_at = now()
         WHERE id = $1::uuid AND $2::int < jsonb_array_length(progress)
           AND progress -> $2::int ->> 'status' IS DISTINCT FROM 'delivered'
        RETURNING id
    )
    INSERT INTO notification_attempts(notification_id, contact_index, channel, attempt, status,
                                      detail, duration_ms)
    SELECT n.id, $2::int, $3, $4::int, 'delivered', $5, $6 FROM notifications n
     WHERE n.id = $1::uuid AND $2::int < jsonb_array_length(n.progress) AND NOT EXISTS (
           SELECT 1 FROM notification_attempts
            WHERE notification_id = $1::uuid AND contact_index = $2::int AND attempt = $4::int
              AND status = 'delivered')
"""


def _attempt_row(a: Attempt) -> tuple[Any, ...]:
    return (a.notification_id, a.contact_index, a.channel, a.attempt, a.status.value, a.detail,
            a.duration_s * 1000.0)


def _job(row: asyncpg.Record) -> Job:
    progress = _progress(row["progress"])
    contacts = _json(row["contacts"])
    return Job(id=row["id"], contacts=contacts, message=row["message"], strategy=row["strategy"],
               subject_name=row["subject_name"], round=row["round"],
               progress=progress if len(progress) == len(contacts) else [])


class NotificationsStore:
    def __init__(self, pool: asyncpg.Pool, events_enabled: bool = False) -> None:
        self.pool = pool
        self.events_enabled = events_enabled  # append event-bus events in each commit

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    # --- accepting ------------------------------------------------------------------
    async def accept(self, drafts: Sequence[NotificationDraft],
                     idempotency: IdempotencyRecord | None = None) -> None:
        rows = [
            (d.id, d.subject_id, d.subject_name, json.dumps(d.contacts), d.message, d.is_immediate,
             d.strategy, json.dumps([ContactProgress().to_json() for _ in d.contacts]),
             datetime.fromtimestamp(d.created_at, UTC))
            for d in drafts
        ]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO notifications(id, subject_id, subject_name, contacts, message,"
                " is_immediate, strategy, progress, created_at)"
                " VALUES ($1::uuid, $2, $3, $4::jsonb, $5, $6, $7, $8::jsonb, $9)", rows)
            await conn.executemany(
                "INSERT INTO notification_outbox(notification_id, immediate) VALUES ($1::uuid, $2)",
                [(d.id, d.is_immediate) for d in drafts])
            if self.events_enabled:
                await event_outbox.append(conn, [notification_event(d.id, "accepted") for d in drafts])
            if idempotency is not None:
                held = await conn.fetchval(
                    "UPDATE notification_idempotency SET status = 'done', response_status = $4,"
                    " response_body = $5 WHERE subject_id = $1 AND key = $2 AND claim_id = $3::uuid"
                    " AND status = 'in_flight' RETURNING key",
                    idempotency.subject_id, idempotency.key, idempotency.claim,
                    idempotency.status, idempotency.body)
                if held is None:  # taken over or released meanwhile: store nothing
                    raise IdempotencyLost(idempotency.key)

    # --- claiming -------------------------------------------------------------------
    async def _claim(self, where: str, args: Sequence[Any], limit: int, lease_s: float) -> list[Job]:
        sql = f"""
            WITH picked AS (
                SELECT notification_id FROM notification_outbox
                 WHERE due_at <= now() AND (lease_until IS NULL OR lease_until < now()) AND {where}
                 ORDER BY due_at
                 LIMIT {int(limit)}
                 FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE notification_outbox o
                   SET lease_until = now() + make_interval(secs => {float(lease_s)})
                  FROM picked WHERE o.notification_id = picked.notification_id
                RETURNING o.notification_id, o.round
            )
            SELECT {_CLAIM_COLUMNS}
              FROM leased o JOIN notifications n ON n.id = o.notification_id
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(sql, *args)
            if rows:
                started = await conn.fetch(
                    "UPDATE notifications SET state = 'processing', updated_at = now()"
                    " WHERE id = ANY($1::uuid[]) AND state = 'accepted' RETURNING id::text",
                    [r["id"] for r in rows])
                if self.events_enabled:
                    await event_outbox.append(conn, [notification_event(r["id"], "processing")
                                                     for r in started])
        return [_job(r) for r in rows]

    async def claim_ids(self, ids: Sequence[str], lease_s: float) -> list[Job]:
        """The given notifications, if they are due and nobody holds them."""
        if not ids:
            return []
        return await self._claim("notification_id = ANY($1::uuid[])", [list(ids)], len(ids), lease_s)

    async def claim_urgent(self, limit: int, lease_s: float) -> list[Job]:
        """Immediate notifications (whose hand-off was lost or whose process died) and
        retries that are due."""
        return await self._claim("(immediate OR round > 0)", [], limit, lease_s)

    async def claim_queued(self, limit: int, lease_s: float) -> list[Job]:
        """Queued notifications never tried yet: the batch flush."""
        return await self._claim("(NOT immediate AND round = 0)", [], limit, lease_s)

    # --- recording ------------------------------------------------------------------
    async def record_delivered(self, attempt: Attempt) -> None:
        """One delivered send, committed before this returns: the contact is marked
        delivered in the notification's progress (with ``attempt.attempt`` attempts) and
        the attempt is stored, in one statement (one round trip: the dispatcher makes this
        call between two sends of a lane). Marking takes the notification's row lock, as
        ``finish_round`` does, so a round ending meanwhile is waited for and then kept
        (``finish_round`` adopts the delivery). A repeat changes nothing; an unknown
        notification or contact is ignored. With the event bus on, the attempt's event
        (status ``processing``: the round has not ended) is appended in the same
        transaction, once: ``finish_round`` does not repeat it."""
        if attempt.status is not SendStatus.DELIVERED:
            raise ValueError(f"record_delivered got a {attempt.status.value} attempt")
        args = (attempt.notification_id, attempt.contact_index, attempt.channel,
                attempt.attempt, attempt.detail, attempt.duration_s * 1000.0,
                json.dumps(ContactProgress(ContactStatus.DELIVERED, attempt.attempt).to_json()))
        if not self.events_enabled:
            await self.pool.execute(_RECORD_DELIVERED, *args)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.execute(_RECORD_DELIVERED, *args) != "INSERT 0 0":
                await event_outbox.append(conn, [attempt_event(attempt, "processing")])

    async def finish_round(self, results: Sequence[RoundResult]) -> None:
        """The round's attempts, each job's progress and its final state or next due time,
        in one transaction. The notifications' rows are locked first (in id order) and
        their stored progress adopted: a contact recorded delivered (``record_delivered``,
        by this round or by another dispatcher meanwhile) stays delivered and the job's
        final state accounts for it; a delivery already stored is not stored again."""
        if not results:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id::text AS id, progress FROM notifications WHERE id = ANY($1::uuid[])"
                " ORDER BY id FOR UPDATE", sorted({r.job.id for r in results}))
            stored = {r["id"]: _progress(r["progress"]) for r in rows}
            results = [adopt_recorded(r, stored.get(r.job.id, [])) for r in results]
            attempts: list[Attempt] = [a for r in results for a in r.attempts]
            recorded = (await self._recorded(conn, attempts)) if self.events_enabled else set()
            if attempts:
                await conn.executemany(_INSERT_ATTEMPT, [_attempt_row(a) for a in attempts])
            await conn.executemany(
                "UPDATE notifications SET progress = $2::jsonb, updated_at = now(),"
                " state = COALESCE($3, state), finished_at = CASE WHEN $3::text IS NULL"
                " THEN NULL ELSE now() END WHERE id = $1::uuid",
                [(r.job.id, json.dumps([p.to_json() for p in r.job.progress]),
                  r.final.value if r.final else None) for r in results])
            done = [r.job.id for r in results if r.final is not None]
            if done:
                await conn.execute("DELETE FROM notification_outbox WHERE notification_id = ANY($1::uuid[])",
                                   done)
            later = [(r.job.id, r.job.round, r.retry_in_s) for r in results if r.final is None]
            if later:
                await conn.executemany(
                    "UPDATE notification_outbox SET round = $2, lease_until = NULL,"
                    " due_at = now() + make_interval(secs => $3::float8)"
                    " WHERE notification_id = $1::uuid", later)
            if self.events_enabled:
                await event_outbox.append(conn, round_events(results, recorded))

    @staticmethod
    async def _recorded(conn: asyncpg.Connection,
                        attempts: Sequence[Attempt]) -> set[tuple[str, int, int]]:
        """Which of these deliveries are stored already (by ``record_delivered``)."""
        ids = sorted({a.notification_id for a in attempts if a.status is SendStatus.DELIVERED})
        if not ids:
            return set()
        rows = await conn.fetch(
            "SELECT notification_id::text AS id, contact_index, attempt FROM notification_attempts"
            " WHERE notification_id = ANY($1::uuid[]) AND status = 'delivered'", ids)
        return {(r["id"], r["contact_index"], r["attempt"]) for r in rows}

    async def release(self, ids: Sequence[str]) -> None:
        """Give claimed rows back (a round could not run): claimable again at once."""
        await self.pool.execute(
            "UPDATE notification_outbox SET lease_until = NULL WHERE notification_id = ANY($1::uuid[])",
            list(ids))

    # --- reading --------------------------------------------------------------------
    async def get(self, notification_id: str) -> dict[str, Any] | None:
        """The notification as the API shows it, with its attempts per contact."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT n.*, o.round AS out_round, o.due_at AS next_at FROM notifications n"
                " LEFT JOIN notification_outbox o ON o.notification_id = n.id WHERE n.id = $1::uuid",
                notification_id)
            if row is None:
                return None
            attempts = await conn.fetch(
                "SELECT contact_index, channel, attempt, status, detail, duration_ms, at"
                " FROM notification_attempts WHERE notification_id = $1::uuid ORDER BY id",
                notification_id)
        contacts = _json(row["contacts"])
        progress = _progress(row["progress"])
        channels = []
        for i, c in enumerate(contacts):
            p = progress[i] if i < len(progress) else ContactProgress()
            channels.append({
                "contact": c, "status": p.status.value, "attempts": [
                    {"attempt": a["attempt"], "channel": a["channel"], "status": a["status"],
                     "detail": a["detail"], "durationMs": round(a["duration_ms"], 1),
                     "at": _ts(a["at"])}
                    for a in attempts if a["contact_index"] == i],
            })
        subject: dict[str, Any] = {"id": row["subject_id"]}
        if row["subject_name"]:
            subject["name"] = row["subject_name"]
        return {
            "id": str(row["id"]), "state": row["state"], "createdAt": _ts(row["created_at"]),
            "updatedAt": _ts(row["updated_at"]), "finishedAt": _ts(row["finished_at"]),
            "nextAttemptAt": _ts(row["next_at"]) if row["state"] not in
            {s.value for s in FinalState} else None,
            "contacts": contacts, "message": row["message"], "isImmediate": row["is_immediate"],
            "strategy": row["strategy"], "subject": subject, "channels": channels,
        }

    async def owner_of(self, notification_id: str) -> str | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT subject_id FROM notifications WHERE id = $1::uuid", notification_id)

    async def stats(self) -> dict[str, float]:
        row = await self.pool.fetchrow(
            "SELECT count(*) AS pending,"
            " COALESCE(EXTRACT(EPOCH FROM now() - min(n.created_at)), 0) AS oldest"
            " FROM notification_outbox o JOIN notifications n ON n.id = o.notification_id")
        assert row is not None
        return {"pending": float(row["pending"]), "oldestAgeS": float(row["oldest"])}

    # --- idempotency ----------------------------------------------------------------
    async def idempotency_begin(self, subject_id: str, key: str, request_hash: str,
                                ttl_s: float, lease_s: float) -> IdempotencyClaim:
        """Claim a key for this request, or say what to answer instead.

        A key in flight longer than ``lease_s`` belonged to a request that never finished
        (its process died): it is taken over, with a new claim. Expired keys are replaced."""
        claim = str(uuid.uuid4())
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO notification_idempotency(subject_id, key, request_hash, lease_until,"
                " expires_at, claim_id) VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8),"
                " now() + make_interval(secs => $5::float8), $6::uuid)"
                " ON CONFLICT (subject_id, key) DO NOTHING RETURNING key",
                subject_id, key, request_hash, lease_s, ttl_s, claim)
            if row is not None:
                return IdempotencyClaim("new", claim=claim)
            old = await conn.fetchrow(
                "SELECT request_hash, status, response_status, response_body,"
                " expires_at < now() AS expired, lease_until < now() AS abandoned"
                " FROM notification_idempotency WHERE subject_id = $1 AND key = $2 FOR UPDATE",
                subject_id, key)
            if old is None:  # removed meanwhile (a failed request released it)
                return IdempotencyClaim("in_flight")
            if old["expired"] or (old["status"] == "in_flight" and old["abandoned"]
                                  and old["request_hash"] == request_hash):
                await conn.execute(
                    "UPDATE notification_idempotency SET request_hash = $3, status = 'in_flight',"
                    " response_status = NULL, response_body = NULL, created_at = now(),"
                    " lease_until = now() + make_interval(secs => $4::float8),"
                    " expires_at = now() + make_interval(secs => $5::float8), claim_id = $6::uuid"
                    " WHERE subject_id = $1 AND key = $2", subject_id, key, request_hash, lease_s,
                    ttl_s, claim)
                return IdempotencyClaim("new", claim=claim)
            if old["request_hash"] != request_hash:
                return IdempotencyClaim("conflict")
            if old["status"] != "done":
                return IdempotencyClaim("in_flight")
            return IdempotencyClaim("replay", old["response_status"], bytes(old["response_body"]))

    async def idempotency_finish(self, subject_id: str, key: str, status: int, body: bytes,
                                 claim: str | None = None) -> bool:
        """Store the response of a request that stored no notification (e.g. a 400). Only
        a key still in flight (for ``claim``, when given) is updated; returns whether it was."""
        done = await self.pool.execute(
            "UPDATE notification_idempotency SET status = 'done', response_status = $3,"
            " response_body = $4 WHERE subject_id = $1 AND key = $2 AND status = 'in_flight'"
            " AND ($5::uuid IS NULL OR claim_id = $5::uuid)", subject_id, key, status, body, claim)
        return done.split()[-1] != "0"

    async def idempotency_release(self, subject_id: str, key: str, claim: str | None = None) -> None:
        """The request failed before anything was stored: the key may be used again. A key
        already done (its notifications were committed) is kept: repeats replay it."""
        await self.pool.execute(
            "DELETE FROM notification_idempotency WHERE subject_id = $1 AND key = $2 AND"
            " status = 'in_flight' AND ($3::uuid IS NULL OR claim_id = $3::uuid)",
            subject_id, key, claim)

    async def purge_expired(self) -> int:
        """Remove expired idempotency keys (the dispatcher calls this periodically)."""
        done = await self.pool.execute("DELETE FROM notification_idempotency WHERE expires_at < now()")
        return int(done.split()[-1])
