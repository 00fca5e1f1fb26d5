"""``HubLink``: this replica's side of the connection hub.

It admits new sockets under the per-user caps (``admit``: one call to the user's hub
shard, see ``limits``), registers sockets with the hub (presence), long-polls each hub
shard's mailbox for this replica and writes what arrives to the sockets
(``message``/``command`` frames in seq order through each ``Connection``), re-reads from
the store whenever frames may have been lost (a hub restart, a shed mailbox), and
redelivers what was not receipted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.telemetry import Recorder
from deployments.gateway.connection import Connection, guarded
from deployments.gateway.intake import Intake
from deployments.gateway.limits import ConnectionLimits, Refusal
from deployments.gateway.sessions import Sessions
from settings import Settings
from stages.ports import ChatStore, ConnectionRegistry, Delivery, Outages

log = logging.getLogger("conveyor.gateway")

ADMIT_TIMEOUT_S = 2.0  # longest wait for the hub's answer to a connection attempt
UNREACHABLE_LOG_EVERY_S = 10.0  # one warning per this long while admission falls back


class HubLink:
    def __init__(self, settings: Settings, hub: ConnectionRegistry, chats: ChatStore,
                 sessions: Sessions, intake: Intake, recorder: Recorder, outages: Outages,
                 replica_id: str) -> None:
        self.settings = settings
        self.hub = hub
        self.chats = chats
        self.sessions = sessions
        self.intake = intake
        self.recorder = recorder
        self.outages = outages
        self.replica_id = replica_id
        self._releases: set[asyncio.Task[None]] = set()
        self._warned_at = -UNREACHABLE_LOG_EVERY_S

    def tasks(self) -> list[asyncio.Task[None]]:
        return [*(asyncio.create_task(self._pull_loop(s)) for s in range(self.hub.shards)),
                asyncio.create_task(self._redelivery_loop())]

    async def admit(self, conn: Connection, limits: ConnectionLimits) -> Refusal | None:
        """Decides whether the new socket ``conn`` may open (None) under the per-user caps,
        cluster-wide: one call to the user's hub shard, which counts the attempt and
        reserves the slot. Once admitted, ``conn`` is counted here until it is removed from
        the sessions, and at the hub until it is detached (``disconnected``).

        Falls back to ``limits`` (this replica's own counts) when the shard does not answer
        within ``ADMIT_TIMEOUT_S`` (logged, counted as ``unavailable{dependency="hub",
        stage="admit"}``), and applies them as well when the shard's admission is not
        certain (it restarted moments ago)."""
        user = conn.user_id
        open_here = self.sessions.count(user)
        self.sessions.admitting(conn)
        try:
            admission = await asyncio.wait_for(
                self.hub.admit(self.replica_id, conn.id, user, open_here, limits.max_open,
                               limits.attempts_per_minute), ADMIT_TIMEOUT_S)
        except asyncio.CancelledError:
            self.sessions.remove(conn)
            self._release(conn)  # the call may have reserved a slot all the same
            raise
        except Exception as exc:
            self.outages.unavailable("hub", "admit", 1)
            now = time.monotonic()
            if now - self._warned_at >= UNREACHABLE_LOG_EVERY_S:
                self._warned_at = now
                log.warning("hub shard %d did not answer an admission (%r): connection caps "
                            "hold per replica meanwhile", self.hub.shard(user), exc)
            refusal = limits.admit(user, open_here)
            reserved = True  # the call may still reach the shard
        else:
            refusal = limits.refusal(admission)
            reserved = refusal is None
            if refusal is None and not admission.certain:
                refusal = limits.admit(user, open_here)
        if refusal is not None:
            self.sessions.remove(conn)
            if reserved:
                self._release(conn)  # a slot the hub reserved (or may) goes unused
        return refusal

    def _release(self, conn: Connection) -> None:
        """Gives up ``conn``'s reservation at the hub, in the background."""
        task = asyncio.create_task(self._detach(conn))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _detach(self, conn: Connection) -> None:
        await guarded(self.hub.detach(self.replica_id, [(conn.id, conn.user_id)]), "hub release")

    async def connected(self, conn: Connection) -> None:
        """A new socket: registered with its hub shard (if the shard is down, later)."""
        came = await guarded(self.hub.attach(self.replica_id, [(conn.id, conn.user_id)]),
                             "hub attach")
        if came is None:
            self.outages.unavailable("hub", "attach", 1)
            self.sessions.unattached.add(conn.id)
        for who in came or ():
            self.intake.presence(who, True)

    async def disconnected(self, conn: Connection) -> None:
        gone = await guarded(self.hub.detach(self.replica_id, [(conn.id, conn.user_id)]),
                             "hub detach")
        for who in gone or ():
            self.intake.presence(who, False)

    async def _pull_loop(self, shard: int) -> None:
        while True:
            try:
                got = await self.hub.pull(shard, self.replica_id, self.settings.hub_pull_wait_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("hub shard %d unreachable: %r", shard, exc)
                self.outages.unavailable("hub", "pull", 1)
                await asyncio.sleep(1.0)
                continue
            if got is None:
                # The hub does not know us (restarted, or we were reaped): attach again.
                # Users it did not know are online again for their contacts.
                await self._attach(shard, self._on_shard(shard), "hub re-attach")
                await self._resync(shard)
                continue
            if self.sessions.unattached:
                await self._attach_pending(shard)
            for users, frame, skip, _ in got:
                kind = frame.get("type")
                if kind == "_resync":
                    await self._resync(shard)
                elif kind == "_offline":
                    # Users of a gateway replica the hub presumed dead: their contacts
                    # hear it from whichever replica pulled first.
                    seen = frame.get("lastSeen", {})
                    for user in users:
                        self.intake.presence(user, False, seen.get(user))
                else:
                    self.sessions.deliver([Delivery(users, frame, skip)])

    def _on_shard(self, shard: int) -> list[Connection]:
        return [c for c in self.sessions.all() if self.hub.shard(c.user_id) == shard]

    async def _attach_pending(self, shard: int) -> None:
        """Attach sockets whose attach failed at connect, now that this shard answers."""
        conns = [c for cid in list(self.sessions.unattached)
                 if (c := self.sessions.get(cid)) is not None
                 and self.hub.shard(c.user_id) == shard]
        if conns and await self._attach(shard, conns, "hub attach (pending)"):
            await self._resync(shard, conns)  # what was published for them meanwhile

    async def _attach(self, shard: int, conns: list[Connection], what: str) -> bool:
        """Register ``conns`` with a hub shard; users who came online are announced.
        False when the shard did not answer (they stay unattached)."""
        came = await guarded(self.hub.attach_shard(
            shard, self.replica_id, [(c.id, c.user_id) for c in conns]), what)
        if came is None:
            self.outages.unavailable("hub", "attach", len(conns))
            return False
        self.sessions.unattached.difference_update(c.id for c in conns)
        for who in came:
            self.intake.presence(who, True)
        return True

    async def _resync(self, shard: int, only: list[Connection] | None = None) -> None:
        """Frames from this hub shard may have been lost: re-read from the store."""
        conns = only if only is not None else self._on_shard(shard)
        log.info("resync of %d connections after a hub restart or shed frames", len(conns))
        for conn in conns:
            pointers = await guarded(self.chats.pointers(conn.user_id), "resync pointers")
            if pointers:
                conn.resync(pointers)

    async def _redelivery_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in self.sessions.all():
                for chat_id in conn.due_redelivery(now, self.settings.redelivery_base_s,
                                                   self.settings.redelivery_max_s):
                    self.recorder.inc("conveyor_redeliveries_total")
                    conn.catch_up(chat_id)
