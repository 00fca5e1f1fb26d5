"""Delivery: getting frames to the gateway replicas that hold recipients' sockets,
and answering senders (acks, system notices)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol


class Delivery(NamedTuple):
    """One frame for some users. ``skip``: a connection that must not get it (the
    sender's own, which already has its ack); ``local``: a gateway replica that hands the
    frame to its own sockets itself, so the hub routes it to the other replicas only.
    Transport details, kept out of the frame."""

    users: Sequence[str]
    frame: dict[str, Any]
    skip: str | None = None
    local: str | None = None


class DeliveryHub(Protocol):
    """Routes frames to the gateway replicas holding the recipients' sockets.

    At-most-once and best-effort: a frame for a user with no live connection is not
    kept. Durable types therefore rely on the store (replay on reconnect, redelivery)
    and use the hub only as the fast path. Frames published in one call for one user
    reach that user's gateway in the order given.
    """

    async def publish(self, deliveries: Sequence[Delivery]) -> None: ...


class Admission(NamedTuple):
    """A hub shard's answer to one connection attempt (``ConnectionRegistry.admit``).

    ``refused``: None when admitted (a slot is reserved for the connection); ``"attempts"``
    when the user made too many attempts in the last minute (``retry_after``: seconds
    until one is back); ``"connections"`` when the user holds as many connections as
    allowed (``retry_after`` None: it depends on other sockets closing).
    ``certain``: False when the shard may not know every connection of the user yet (it
    restarted less than the gateway TTL ago and gateways are still attaching theirs
    again): an admission is then only as good as what the shard knows, and the caller
    applies its own caps as well. A refusal is always certain (what the shard knows is a
    lower bound)."""

    refused: str | None = None
    retry_after: float | None = None
    certain: bool = True


class ConnectionRegistry(DeliveryHub, Protocol):
    """The hub as gateways see it: where each user's connections are (presence), and a
    mailbox per gateway replica, sharded by user.

    - ``attach``/``detach`` register connections; each returns the users who came online
      (went offline) by it, so presence changes are announced once. Both are idempotent
      per connection id. ``attach`` turns a connection's reservation (``admit``) into the
      connection; ``detach`` also releases a reservation not attached.
    - ``pull`` long-polls one shard's mailbox of a gateway for up to ``wait_s``; it returns
      None when the shard does not know the gateway (restarted, or the gateway was
      presumed dead), and on a gateway's first pull from the shard even if attaches came
      first: the gateway attaches its connections again and re-reads from the store what
      it may have missed. Frames are handed out once (at-most-once).
    - A shard that loses frames (a full mailbox) says so in the next pull, with an item
      whose frame type is ``_resync``.
    - ``admit`` holds the per-user caps on connections cluster-wide (below).
    """

    @property
    def shards(self) -> int: ...

    def shard(self, user: str) -> int: ...

    async def attach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def attach_shard(self, shard: int, gateway: str,
                           conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def detach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def pull(self, shard: int, gateway: str, wait_s: float) -> list[Delivery] | None: ...

    async def admit(self, gateway: str, conn: str, user: str, open_here: int,
                    max_open: int, attempts_per_minute: int) -> Admission:
        """One connection attempt of ``user`` at ``gateway``, decided atomically by the
        shard that owns the user: the attempt is counted (a token bucket per user of
        ``attempts_per_minute`` tokens, one back every ``60 / attempts_per_minute`` s;
        refused attempts count too), then, if the user holds fewer than ``max_open``
        connections, a slot is reserved for ``conn``.

        Connections counted: ``open_here`` (the caller's own: its open sockets of the user
        and its admissions in flight, this one excluded) plus the connections and
        reservations other gateways hold on the shard.

        A reservation becomes the connection when ``conn`` is attached; it is released by
        ``detach``, when ``gateway`` is presumed dead, or when it is not attached within
        the gateway TTL (a socket that never completed). A repeat for a ``conn`` already
        reserved or attached is admitted again and counts nothing. A shard that restarted
        has no buckets or reservations; it rebuilds its connections from the gateways'
        re-attach, and until a gateway TTL has passed its admissions are not ``certain``.
        Raises when the shard cannot be reached: the caller decides with its own counts
        (the caps then hold per gateway replica)."""
        ...

    async def presence(self, users: Sequence[str]) -> list[tuple[str, bool, float | None]]:
        """(user, online, last seen epoch seconds or None), in the order asked."""
        ...

    async def stats(self) -> list[dict[str, Any]]:
        """Per shard: ``users_online``, ``mailbox_depth``, ``shed_by_type`` and more."""
        ...


class LocalDelivery(Protocol):
    """The gateway replica's own sockets: frames handed straight to the connections of
    ``users`` held by this replica (not to ``skip``), in the order given, at-most-once
    like the hub. Only the gateway has this port."""

    def deliver(self, deliveries: Sequence[Delivery]) -> None: ...


class AckSink(Protocol):
    """Sends ``ack`` frames to senders. Best-effort: a sender gone is skipped. Called
    only after what the ack confirms is durable (the pipeline puts ``ack`` after persist)."""

    async def acknowledge(self, batch: Sequence[Any]) -> None: ...


class Notices(Protocol):
    """Server-generated ``system`` frames to a sender's connection: no ack, never stored,
    best-effort (a connection gone is skipped)."""

    def notify(self, connection: str | None, event: str, data: Mapping[str, Any]) -> None: ...

