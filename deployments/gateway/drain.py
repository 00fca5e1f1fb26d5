"""Knowing when Serve starts draining this replica.

Serve calls a deployment's ``__del__`` only after its in-flight requests have finished,
and a WebSocket is an in-flight request for as long as it is open: without help, a
gateway replica being replaced would hold its sockets until the force-kill deadline and
its clients would learn nothing. Serve's replica object marks itself ``_shutting_down``
when the drain starts; we find that object once and watch the flag, so the gateway can
tell its clients to reconnect (``system`` ``reconnect``) and close their sockets, which
lets the drain finish. This relies on a private attribute of Ray 2.60: if it is not
found, the gateway falls back to ``__del__`` and says so in its log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("conveyor.gateway")


def replica_of(user_object: Any) -> Any | None:
    """Serve's replica object running ``user_object`` (the actor's ``_replica_impl``)."""
    try:
        import ray

        actors = list(ray._private.worker.global_worker.actors.values())
    except Exception:
        return None
    for actor in actors:
        impl = getattr(actor, "_replica_impl", None)
        wrapper = getattr(impl, "_user_callable_wrapper", None)
        if getattr(wrapper, "_callable", None) is user_object:
            return impl
    return None


async def watch_drain(user_object: Any, on_drain: Callable[[], Awaitable[None]],
                      period_s: float = 0.5) -> None:
    replica = replica_of(user_object)
    if replica is None or not hasattr(replica, "_shutting_down"):
        log.warning("cannot watch Serve's drain flag; clients learn of shutdown on close only")
        return
    while not replica._shutting_down:  # noqa: ASYNC110 (a flag owned by Serve, no event to wait on)
        await asyncio.sleep(period_s)
    log.info("replica draining: asking clients to reconnect")
    await on_drain()
