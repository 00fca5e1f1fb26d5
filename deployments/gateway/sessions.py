"""``Sessions``: the WebSocket connections this gateway replica holds, by id and by user,
and handing frames to them (the ``LocalDelivery`` port)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from deployments.gateway.connection import Connection
from stages.ports import Delivery

# Frames that belong to a chat's seq stream: written in order, gap-free, redelivered.
ORDERED_FRAMES = frozenset({"message", "command"})


class Sessions:
    def __init__(self) -> None:
        self.by_id: dict[str, Connection] = {}
        self.by_user: dict[str, set[Connection]] = {}
        # Connections whose hub attach failed (a hub shard restarting): the pull loop of
        # their shard attaches them once the shard answers again.
        self.unattached: set[str] = set()
        # Connections admitted (or being admitted) and not added yet, by user: they count
        # against the user's cap here like open ones.
        self.opening: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def count(self, user_id: str) -> int:
        """The user's connections here: open, and being opened."""
        return len(self.by_user.get(user_id, ())) + len(self.opening.get(user_id, ()))

    def admitting(self, conn: Connection) -> None:
        """``conn`` is being admitted: counted until it is added or removed."""
        self.opening.setdefault(conn.user_id, set()).add(conn.id)

    def _opened(self, conn: Connection) -> None:
        ids = self.opening.get(conn.user_id)
        if ids is not None:
            ids.discard(conn.id)
            if not ids:
                del self.opening[conn.user_id]

    def add(self, conn: Connection) -> None:
        self._opened(conn)
        self.by_id[conn.id] = conn
        self.by_user.setdefault(conn.user_id, set()).add(conn)

    def remove(self, conn: Connection) -> None:
        self._opened(conn)
        self.by_id.pop(conn.id, None)
        self.unattached.discard(conn.id)
        peers = self.by_user.get(conn.user_id)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self.by_user[conn.user_id]

    def get(self, connection_id: str | None) -> Connection | None:
        return self.by_id.get(connection_id or "")

    def of_user(self, user_id: str) -> Iterable[Connection]:
        return self.by_user.get(user_id, ())

    def all(self) -> list[Connection]:
        return list(self.by_id.values())

    def deliver(self, deliveries: Sequence[Delivery]) -> None:
        """Frames to the connections of their users on this replica: ``message`` and
        ``command`` frames through each connection's ordered writer, others as they are."""
        for d in deliveries:
            ordered = d.frame.get("type") in ORDERED_FRAMES
            for user in d.users:
                for conn in self.of_user(user):
                    if ordered:
                        conn.deliver(d.frame, d.skip)
                    else:
                        conn.send(d.frame)
