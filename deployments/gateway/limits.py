"""Per-user caps on WebSocket connections, held across every gateway replica.

Two caps, each refused with its own close code (``close_codes``):

- open connections per user (``max_connections_per_user``);
- connection attempts per user and minute (``connection_attempts_per_minute``): a token
  bucket per user (``stages.buckets``) holding a minute's worth of attempts and refilled
  one attempt at a time, so at most ``N + N * w / 60`` attempts pass in any ``w`` seconds.
  Every authenticated attempt draws from it, refused ones included.

Both are decided cluster-wide by the hub shard that owns the user
(``ConnectionRegistry.admit``, ``cluster/hub.py``): it counts the attempt and reserves the
connection's slot in one call, over the connections of every replica. ``refusal`` turns its
answer into a ``Refusal``. ``ConnectionLimits.admit`` is the same pair of caps over this
replica's own counts: it decides alone when the hub shard cannot be reached (the caps then
hold per replica, as a floor: a hub outage never refuses everyone), and together with the
hub while a restarted shard does not know every connection yet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.gateway.close_codes import TOO_MANY_ATTEMPTS, TOO_MANY_CONNECTIONS
from stages.buckets import TokenBuckets
from stages.ports.delivery import Admission

FORGET_EVERY_S = 60.0  # how often buckets that are full again are dropped from memory


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is refused: its close code, a reason for the close frame, and
    when an attempt may succeed again (seconds; None when it depends on other sockets)."""

    code: int
    reason: str
    retry_after: float | None = None


class ConnectionLimits:
    def __init__(self, max_open: int, attempts_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_open = max_open
        self.attempts_per_minute = attempts_per_minute
        self.attempts = TokenBuckets(attempts_per_minute, 1, 60.0 / attempts_per_minute)
        self.clock = clock
        self._forgot_at = clock()

    def too_many_attempts(self, retry_after: float) -> Refusal:
        wait = math.ceil(retry_after)
        return Refusal(TOO_MANY_ATTEMPTS, f"too many connection attempts: retry in {wait} s", wait)

    def too_many_connections(self) -> Refusal:
        return Refusal(TOO_MANY_CONNECTIONS,
                       f"too many open connections (at most {self.max_open} per user)")

    def refusal(self, admission: Admission) -> Refusal | None:
        """The hub's answer as a ``Refusal`` (None: admitted)."""
        if admission.refused == "attempts":
            return self.too_many_attempts(admission.retry_after or 0.0)
        if admission.refused == "connections":
            return self.too_many_connections()
        return None

    def admit(self, user_id: str, open_now: int) -> Refusal | None:
        """This replica's own decision: counts one attempt of ``user_id``, who holds
        ``open_now`` connections here; None when the connection may open."""
        now = self.clock()
        if now - self._forgot_at >= FORGET_EVERY_S:
            self.attempts.forget_idle(now)
            self._forgot_at = now
        debit = self.attempts.debit(user_id, 1, now)
        if not debit.granted:
            return self.too_many_attempts(debit.retry_after)
        if open_now >= self.max_open:
            return self.too_many_connections()
        return None
