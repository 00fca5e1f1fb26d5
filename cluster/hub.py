"""The connection hub: which gateway replica holds which user's sockets, and a mailbox
per gateway replica that it long-polls.

Ray 2.60 cannot call one chosen replica of a deployment, so deliveries flow the other way:
a stage publishes frames for users to the hub shard that owns them (users are hashed onto
shards); the hub appends them to the mailbox of each replica where the user has a
connection; each gateway replica pulls its mailbox. This doubles as the presence registry.

Guarantees: best-effort, at-most-once per publish. A frame for a user with no live
connection is dropped (durable types are replayed from the store on reconnect). A mailbox
over ``mailbox_limit`` sheds its oldest frames (counted) and the next ``pull`` starts with
a ``RESYNC`` item, so the gateway re-reads what its sockets may have missed from the store.
A gateway replica that has not pulled for ``gateway_ttl_s`` is presumed dead and its
connections are removed; users left with no connection are handed to the next gateway
that pulls (an ``OFFLINE`` item), which tells their contacts as any other presence
change (best-effort, like presence itself). If a hub actor restarts, its state is empty: each gateway notices
(``pull`` returns None), attaches its live connections again and re-reads from the store.
A gateway's first pull from a shard always returns None, even when a connection it just
opened was attached first: so one fresh connection never hides the others after a restart.

Per-user caps (``admit``, the ``ConnectionRegistry`` port): the shard that owns a user also
holds the user's connection attempts (a token bucket) and the slots reserved for
connections being opened, so both caps hold across every gateway replica. The attempt is
counted and the slot reserved in one actor call (an actor runs one call at a time to its
first ``await``, and ``admit`` has none). A reservation turns into the connection when it
is attached, and is released by ``detach``, by reaping its gateway, or after
``gateway_ttl_s`` without an attach. After a restart the shard knows only the connections
gateways attached again: for ``gateway_ttl_s`` (by then every live gateway has pulled and
re-attached) its admissions are not ``certain`` and gateways apply their own caps too.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.sharding import named_actor, shard_of
from stages.buckets import TokenBuckets
from stages.ports import Delivery
from stages.ports.delivery import Admission

RESYNC = Delivery((), {"type": "_resync"})
OFFLINE = "_offline"  # users: who went offline with a dead gateway; lastSeen: user -> epoch


@dataclass
class _Gateway:
    last_seen: float
    conns: dict[str, str] = field(default_factory=dict)  # connection id -> user id
    mailbox: list[Delivery] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False  # frames were shed since the last pull
    pulled: bool = False  # the gateway pulled since this entry was made


FORGET_EVERY_S = 60.0  # how often attempt buckets that are full again are dropped


class Admissions:
    """A hub shard's side of the per-user connection caps, over the connections the shard
    knows (passed in by the caller): attempts per user and minute, and the slots reserved
    for connections being opened. Plain state on ``clock`` (monotonic seconds)."""

    def __init__(self, reservation_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reservation_ttl_s = reservation_ttl_s
        self.clock = clock
        self.attempts: TokenBuckets | None = None
        self._per_minute = 0
        self._forgot_at = clock()
        # user -> connection id -> (gateway, expires at); and connection id -> user
        self.reserved: dict[str, dict[str, tuple[str, float]]] = {}
        self.owner: dict[str, str] = {}

    def _bucket(self, per_minute: int) -> TokenBuckets:
        if self.attempts is None or per_minute != self._per_minute:
            # A new rate (settings changed): buckets start full again.
            self.attempts = TokenBuckets(per_minute, 1, 60.0 / per_minute)
            self._per_minute = per_minute
        return self.attempts

    def admit(self, user: str, conn: str, gateway: str, held: Mapping[str, int],
              open_here: int, max_open: int, per_minute: int, certain: bool = True) -> Admission:
        """``held``: the user's attached connections per gateway, as the shard knows them;
        ``open_here``: the caller's own count (it replaces ``held[gateway]`` and the
        caller's reservations, which it includes)."""
        now = self.clock()
        mine = self.reserved.get(user)
        if mine is not None and conn in mine:
            return Admission(certain=certain)  # a repeat: counted once
        if now - self._forgot_at >= FORGET_EVERY_S:
            self._forgot_at = now
            if self.attempts is not None:
                self.attempts.forget_idle(now)
        debit = self._bucket(max(1, per_minute)).debit(user, 1, now)
        if not debit.granted:
            return Admission("attempts", debit.retry_after)
        self._expire(user, now)
        mine = self.reserved.get(user, {})
        elsewhere = sum(n for gw, n in held.items() if gw != gateway)
        elsewhere += sum(1 for gw, _ in mine.values() if gw != gateway)
        if open_here + elsewhere >= max_open:
            return Admission("connections")
        self.reserved.setdefault(user, {})[conn] = (gateway, now + self.reservation_ttl_s)
        self.owner[conn] = user
        return Admission(certain=certain)

    def release(self, conn: str) -> bool:
        """Drops ``conn``'s reservation (attached, closed or never completed)."""
        user = self.owner.pop(conn, None)
        if user is None:
            return False
        mine = self.reserved.get(user)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.reserved[user]
        return True

    def drop_gateway(self, gateway: str) -> None:
        """Releases the reservations of a gateway presumed dead."""
        for mine in list(self.reserved.values()):
            for conn, (gw, _) in list(mine.items()):
                if gw == gateway:
                    self.release(conn)

    def _expire(self, user: str, now: float) -> None:
        for conn, (_, expires) in list(self.reserved.get(user, {}).items()):
            if expires <= now:
                self.release(conn)

    def sweep(self) -> None:
        """Releases every reservation not attached in time."""
        now = self.clock()
        for user in list(self.reserved):
            self._expire(user, now)

    def __len__(self) -> int:
        return len(self.owner)


@ray.remote
class ConnectionHub:
    def __init__(self, shard: int, gateway_ttl_s: float = 15.0, mailbox_limit: int = 100_000) -> None:
        self.shard = shard
        self.gateway_ttl_s = gateway_ttl_s
        self.mailbox_limit = mailbox_limit
        self.gateways: dict[str, _Gateway] = {}
        self.users: dict[str, dict[str, int]] = defaultdict(dict)  # user -> gateway -> conns
        self.last_seen: dict[str, float] = {}
        self.published = 0
        self.routed = 0
        self.shed = 0
        self.shed_by_type: dict[str, int] = defaultdict(int)
        # Users gone offline when their gateway was reaped, not yet handed to a gateway.
        self.offline: dict[str, float] = {}
        self._reaped_at = 0.0
        self.admissions = Admissions(gateway_ttl_s)
        self.started = time.monotonic()

    def _gateway(self, gateway: str) -> _Gateway:
        gw = self.gateways.get(gateway)
        if gw is None:
            gw = self.gateways[gateway] = _Gateway(time.time())
        return gw

    def _forget(self, gateway: str, conn: str) -> str | None:
        gw = self.gateways.get(gateway)
        if gw is None:
            return None
        user = gw.conns.pop(conn, None)
        if user is None:
            return None
        per = self.users.get(user, {})
        left = per.get(gateway, 0) - 1
        if left > 0:
            per[gateway] = left
        else:
            per.pop(gateway, None)
        if not per:
            self.users.pop(user, None)
            self.last_seen[user] = time.time()
            return user  # went offline
        return None

    def _reap(self) -> None:
        now = time.time()
        if now - self._reaped_at < 1.0:
            return
        self._reaped_at = now
        gone = False
        for name, gw in list(self.gateways.items()):
            if now - gw.last_seen > self.gateway_ttl_s:
                for conn in list(gw.conns):
                    user = self._forget(name, conn)
                    if user is not None:
                        self.offline[user] = self.last_seen[user]
                        gone = True
                del self.gateways[name]
                self.admissions.drop_gateway(name)
        self.admissions.sweep()
        if gone:
            for gw in self.gateways.values():  # whoever pulls first fans them out
                gw.wake.set()

    def _take_offline(self) -> Delivery | None:
        # A user who reconnected meanwhile is online again: no offline event for them.
        users = {u: t for u, t in self.offline.items() if u not in self.users}
        self.offline.clear()
        if not users:
            return None
        return Delivery(sorted(users), {"type": OFFLINE, "lastSeen": users})

    async def attach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]:
        """Register (connection id, user id) pairs; returns users that just came online."""
        gw = self._gateway(gateway)
        gw.last_seen = time.time()
        came_online = []
        for conn, user in conns:
            self.admissions.release(conn)  # the reservation is now the connection
            if conn in gw.conns:
                continue
            gw.conns[conn] = user
            if user not in self.users:
                came_online.append(user)
            per = self.users[user]
            per[gateway] = per.get(gateway, 0) + 1
        return came_online

    async def detach(self, gateway: str, conns: Sequence[str]) -> list[str]:
        """Forget connections (and release reservations); returns users that went offline."""
        for c in conns:
            self.admissions.release(c)
        return [u for c in conns if (u := self._forget(gateway, c)) is not None]

    async def admit(self, gateway: str, conn: str, user: str, open_here: int,
                    max_open: int, attempts_per_minute: int) -> Admission:
        """``ConnectionRegistry.admit`` on this shard (no ``await``: atomic in the actor)."""
        self._reap()
        gw = self.gateways.get(gateway)
        certain = time.monotonic() - self.started >= self.gateway_ttl_s
        if gw is not None and gw.conns.get(conn) == user:
            return Admission(certain=certain)  # a repeat, already attached
        return self.admissions.admit(user, conn, gateway, self.users.get(user, {}), open_here,
                                     max_open, attempts_per_minute, certain)

    async def publish(self, deliveries: Sequence[Delivery]) -> int:
        """Route frames to the mailboxes of the gateways holding the recipients.
        Returns how many (user, gateway) routes were made."""
        self._reap()
        routed = 0
        touched: set[str] = set()
        for users, frame, skip, local in deliveries:
            per_gw: dict[str, list[str]] = {}
            for user in users:
                for gw_name in self.users.get(user, ()):
                    if gw_name != local:  # that replica delivers to its own sockets
                        per_gw.setdefault(gw_name, []).append(user)
            for gw_name, gw_users in per_gw.items():
                gw = self.gateways[gw_name]
                gw.mailbox.append(Delivery(gw_users, frame, skip))
                touched.add(gw_name)
                routed += len(gw_users)
        for gw_name in touched:
            gw = self.gateways[gw_name]
            if len(gw.mailbox) > self.mailbox_limit:
                over = len(gw.mailbox) - self.mailbox_limit
                for shed in gw.mailbox[:over]:
                    self.shed_by_type[str(shed.frame.get("type"))] += 1
                del gw.mailbox[:over]
                self.shed += over
                gw.lost = True
            gw.wake.set()
        self.published += len(deliveries)
        self.routed += routed
        return routed

    async def pull(self, gateway: str, wait_s: float = 1.0) -> list[Delivery] | None:
        """A gateway's frames, waiting up to wait_s for some. None: this hub did not know
        the gateway (it restarted, or the gateway was reaped), or knew it only from attaches
        since: attach every connection again (the next pull answers as usual)."""
        gw = self.gateways.get(gateway)
        if gw is None or not gw.pulled:
            # Unknown, or known only from an attach of a fresh connection (after a restart,
            # or after the gateway was reaped): its other connections must attach again.
            gw = self._gateway(gateway)
            gw.pulled = True
            gw.last_seen = time.time()
            return None
        gw.last_seen = time.time()
        # Pulls are the one call every live gateway makes all the time: reaping here
        # notices a dead replica even when nothing is published or looked up.
        self._reap()
        if not gw.mailbox and not self.offline:
            gw.wake.clear()
            try:
                await asyncio.wait_for(gw.wake.wait(), wait_s)
            except TimeoutError:
                pass
            if self.gateways.get(gateway) is not gw:
                return None
        out, gw.mailbox = gw.mailbox, []
        offline = self._take_offline()
        if offline is not None:
            out.insert(0, offline)
        if gw.lost:
            gw.lost = False
            out.insert(0, RESYNC)
        gw.last_seen = time.time()
        return out

    async def presence(self, users: Sequence[str]) -> list[tuple[str, bool, float | None]]:
        self._reap()
        now = time.time()
        return [
            (u, True, now) if u in self.users else (u, False, self.last_seen.get(u)) for u in users
        ]

    async def stats(self) -> dict[str, Any]:
        self._reap()
        return {
            "shard": self.shard,
            "gateways": len(self.gateways),
            "connections": sum(len(g.conns) for g in self.gateways.values()),
            "users_online": len(self.users),
            "published": self.published,
            "routed": self.routed,
            "shed": self.shed,
            "shed_by_type": dict(self.shed_by_type),
            "mailbox_depth": sum(len(g.mailbox) for g in self.gateways.values()),
            "reserved": len(self.admissions),
        }


class HubClient:
    """The ``ConnectionRegistry`` port (and so ``DeliveryHub``) over the hub shards."""

    def __init__(self, shards: int = 1, gateway_ttl_s: float = 15.0,
                 prefix: str = "conveyor") -> None:
        self.n = max(1, shards)
        self.actors = [
            named_actor(ConnectionHub, f"{prefix}-hub-{i}", i, gateway_ttl_s) for i in range(self.n)
        ]

    @property
    def shards(self) -> int:
        return self.n

    def shard(self, user: str) -> int:
        return shard_of(user, self.n)

    async def attach_shard(self, shard: int, gateway: str,
                           conns: Sequence[tuple[str, str]]) -> list[str]:
        return list(await self.actors[shard].attach.remote(gateway, list(conns)))

    async def pull(self, shard: int, gateway: str, wait_s: float) -> list[Delivery] | None:
        got = await self.actors[shard].pull.remote(gateway, wait_s)
        return None if got is None else [Delivery(*d) for d in got]

    async def admit(self, gateway: str, conn: str, user: str, open_here: int,
                    max_open: int, attempts_per_minute: int) -> Admission:
        got = await self.actors[self.shard(user)].admit.remote(
            gateway, conn, user, open_here, max_open, attempts_per_minute)
        return Admission(*got)

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        if self.n == 1:
            await self.actors[0].publish.remote(list(deliveries))
            return
        parts: dict[int, list[Delivery]] = defaultdict(list)
        for users, frame, skip, local in deliveries:
            by_shard: dict[int, list[str]] = defaultdict(list)
            for u in users:
                by_shard[self.shard(u)].append(u)
            for s, us in by_shard.items():
                parts[s].append(Delivery(us, frame, skip, local))
        await asyncio.gather(*(self.actors[s].publish.remote(d) for s, d in parts.items()))

    async def attach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]:
        parts: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for conn, user in conns:
            parts[self.shard(user)].append((conn, user))
        res = await asyncio.gather(*(self.actors[s].attach.remote(gateway, c) for s, c in parts.items()))
        return [u for r in res for u in r]

    async def detach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]:
        parts: dict[int, list[str]] = defaultdict(list)
        for conn, user in conns:
            parts[self.shard(user)].append(conn)
        res = await asyncio.gather(*(self.actors[s].detach.remote(gateway, c) for s, c in parts.items()))
        return [u for r in res for u in r]

    async def presence(self, users: Sequence[str]) -> list[tuple[str, bool, float | None]]:
        parts: dict[int, list[str]] = defaultdict(list)
        for u in users:
            parts[self.shard(u)].append(u)
        res = await asyncio.gather(*(self.actors[s].presence.remote(us) for s, us in parts.items()))
        found = {u: (u, online, seen) for r in res for (u, online, seen) in r}
        return [found[u] for u in users]

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(a.stats.remote() for a in self.actors)))
