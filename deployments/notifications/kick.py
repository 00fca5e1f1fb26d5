"""``HandleKick``: the ``DispatchKick`` port over the dispatcher deployment's handle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("conveyor.notifications")


class HandleKick:
    """``DispatchKick`` over the dispatcher's deployment handle: fire and forget."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._pending: set[asyncio.Task[Any]] = set()

    def kick(self, ids: Sequence[str]) -> None:
        async def call() -> None:
            try:
                await self.handle.dispatch_now.remote(list(ids))
            except Exception as exc:  # the outbox loop will send them
                log.warning("dispatch hand-off of %d notifications lost: %r", len(ids), exc)

        task = asyncio.get_running_loop().create_task(call())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
