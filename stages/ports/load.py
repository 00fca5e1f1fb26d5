"""Load: credits per user, dedup windows for unstored types, and rate gates for
outside services."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Debit:
    """The answer to one debit request."""

    granted: bool
    remaining: int
    retry_after: float  # seconds until enough credits are back (0 when granted)


class CreditBank(Protocol):
    """Per-user token buckets shared by every gateway replica.

    ``debit`` is atomic per request: a request is granted in full or not at all, in the
    order given. Buckets live in memory of sharded actors: if a shard is lost its users'
    buckets start full again (the bank errs towards letting people talk). When the bank
    cannot be reached the caller decides (the credits stage lets messages through).
    """

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]: ...


class DedupWindow(Protocol):
    """Short-lived memory of keys seen, for types that are never stored.

    ``first_seen`` marks every key and answers, per key, whether this was its first
    sighting within the window (``ttl_s``). Keys in one call are checked in order, so a key
    repeated in the same batch is a duplicate the second time. Losing a shard forgets its
    keys: a signal resent after that is forwarded again (at-least-once, never lost).
    """

    async def first_seen(self, keys: Sequence[str]) -> list[bool | None]:
        """Per key: True the first sighting, False a repeat, None when the window
        could not be consulted for it (its shard unreachable): callers treat None as
        first seen and may report the outage."""
        ...


class RateGate(Protocol):
    """Paces requests to an outside service that limits how often it may be called.

    ``acquire`` waits until one request for ``key`` (e.g. a Bitrix24 portal) may go; the
    caller sends right after it returns, one ``acquire`` per request. The gate holds its
    ``rate`` (requests per second) and ``burst`` (requests that may go at once after a quiet
    spell): over any window of ``w`` seconds at most ``burst + rate * w`` requests for a
    key pass. A process-local gate holds that per process; a shared gate holds it for every
    process using it (cluster-wide). If the shared state cannot be reached, a shared gate
    falls back to the process-local limit and logs it: the service goes on sending (the
    limit may then be exceeded N-fold for N processes, and the outside service's refusals
    are retried as transient failures) rather than stopping. Losing the shared state
    forgets past requests: at most one extra ``burst`` passes.
    """

    async def acquire(self, key: str) -> None: ...

