"""The PostgreSQL adapter's per-aggregate classes on one pool, addressed as one store in
the integration tests (the application wires them one by one)."""

from __future__ import annotations

from typing import Any

from adapters.postgres.chats import PostgresChats
from adapters.postgres.messages import PostgresMessages
from adapters.postgres.outbox import PostgresOutbox


class PostgresStore:
    """The per-aggregate adapters on one pool, addressed as one in these tests."""

    def __init__(self, pool: Any, events_enabled: bool = False) -> None:
        self.chats = PostgresChats(pool)
        self.messages = PostgresMessages(pool, events_enabled)
        self.outbox = PostgresOutbox(pool)

    def __getattr__(self, name: str) -> Any:
        for part in (self.chats, self.messages):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)
