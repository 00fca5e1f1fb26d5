"""What the composition root hands each deployment: typed services, opened per process.

A Serve deployment's replicas run in processes of their own, so what ``build_app`` binds
into the graph is a *recipe* (:class:`Wiring`, picklable); each replica calls it once in
its constructor and gets the services of its kind, built from the one settings object.
Deployments depend on these types and on the ports of ``stages.ports``, never on the
composition root (``serve_app``) and never on a concrete adapter's constructor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.routing import BaseRoute

from deployments.http import TokenVerifier
from settings import Settings
from stages.bus import IngressHandler, IngressRecord
from stages.notifications import Channel, DispatchKick
from stages.notifications.ports import DispatchQueue, NotificationApiStore
from stages.ports import (
    AttachmentStore,
    ChatStore,
    ConnectionRegistry,
    Directory,
    MessageStore,
    ObjectStore,
    Outbox,
    Ports,
    UploadEndpoint,
)
from stages.resolver import Resolver, StageRegistry

# A readiness check: raises when its dependency is down.
Check = Callable[[], Awaitable[Any]]
# A soft check: a dependency the system works without (Kafka, Redis). Returns its detail
# (``status``: ``up``/``ok``, ``degraded``, ...); raising means ``degraded``. Readiness
# never fails on one.
SoftCheck = Callable[[], Awaitable[Mapping[str, Any]]]


class CacheState(Protocol):
    """What a process saw of the chat cache (running totals), for metrics and health."""

    available: bool
    hits: int
    misses: int
    unavailable: int
    last_error: str | None


class EventRelayLoop(Protocol):
    """The events outbox → broker loop (``adapters.event_relay.EventRelay``)."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    async def status(self) -> Any:
        """Its state with fresh outbox figures; ``.detail()`` is the health detail."""
        ...


class IngressLoop(Protocol):
    """A Kafka ingress consumer (``adapters.kafka_ingress.IngressConsumer``)."""

    stats: Any
    max_batch: int

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    def paused(self) -> set[Any]: ...

    @property
    def pausing(self) -> bool: ...

    @property
    def timeline(self) -> list[tuple[float, str, str]]: ...

    async def dead_letter_valid(self, items: Sequence[tuple[IngressRecord, str]]) -> None: ...


@dataclass
class ChatServices:
    """The messenger's services, for the gateway, stage hosts and the relay."""

    settings: Settings
    chats: ChatStore
    messages: MessageStore
    outbox: Outbox
    directory: Directory
    hub: ConnectionRegistry
    attachments: AttachmentStore
    objects: ObjectStore
    uploads: UploadEndpoint | None  # the embedded object store's endpoint; None with S3
    registry: StageRegistry
    resolver: Resolver
    ports: Ports  # what stages are built with (a process adds its local ports)
    verifier: TokenVerifier
    checks: dict[str, Check] = field(default_factory=dict)  # readiness, by dependency
    routes: list[BaseRoute] = field(default_factory=list)  # API docs, the web client
    soft_checks: dict[str, SoftCheck] = field(default_factory=dict)  # optional dependencies
    cache: CacheState | None = None  # the chat cache's state; None: no cache configured


@dataclass
class NotificationServices:
    """The notification service's: its store, channels and hand-off to the dispatcher."""

    settings: Settings
    store: NotificationApiStore
    queue: DispatchQueue
    channels: Mapping[str, Channel]
    kick: DispatchKick | None
    checks: dict[str, Check] = field(default_factory=dict)


class Wiring(Protocol):
    """The recipe ``build_app`` binds into every deployment (see ``serve_app.bootstrap``)."""

    @property
    def settings(self) -> Settings: ...

    async def open_chat(self) -> ChatServices: ...

    async def open_notifications(self, dispatcher: Any | None = None
                                 ) -> NotificationServices: ...

    async def open_events(self) -> EventRelayLoop:
        """The event relay (only with ``kafka_bootstrap`` set)."""
        ...

    def open_ingress(self, handler: IngressHandler, saturated: Callable[[], Any]
                     ) -> IngressLoop:
        """A consumer of the ingress topic feeding ``handler`` (``kafka_bootstrap`` set)."""
        ...
