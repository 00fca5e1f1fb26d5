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


class ConnectionRegistry(DeliveryHub, Protocol):
    """The hub as gateways see it: where each user's connections are (presence), and a
    mailbox per gateway replica, sharded by user.

    - ``attach``/``detach`` register connections; each returns the users who came online
      (went offline) by it, so presence changes are announced once.
    - ``pull`` long-polls one shard's mailbox of a gateway for up to ``wait_s``; it returns
      None when the shard does not know the gateway (restarted, or the gateway was
      presumed dead): the gateway attaches its connections again and re-reads from the
      store what it may have missed. Frames are handed out once (at-most-once).
    - A shard that loses frames (a full mailbox) says so in the next pull, with an item
      whose frame type is ``_resync``.
    """

    @property
    def shards(self) -> int: ...

    def shard(self, user: str) -> int: ...

    async def attach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def attach_shard(self, shard: int, gateway: str,
                           conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def detach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]: ...

    async def pull(self, shard: int, gateway: str, wait_s: float) -> list[Delivery] | None: ...

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

