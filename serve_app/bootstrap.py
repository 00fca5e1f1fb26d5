"""The composition root: the one place that reads settings and chooses adapters.

``build_app`` binds a :class:`ProcessWiring` (the settings, picklable) into every
deployment; each replica calls ``open_chat`` / ``open_notifications`` once and gets typed
services (``deployments.services``) built here, so a stage runs the same code in a unit
test (with fakes), in one fused deployment, or spread across many. Nothing below
``serve_app`` imports this module. Migrations are not run here: ``migrate_database`` runs
once per deploy (from ``build_app``) or by hand (``conveyor migrate``); replicas only
check that the schema is current.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from adapters.auth import DevKey, JwksKeys, JwtVerifier
from adapters.bitrix import BitrixChannel, local_gate
from adapters.cached_directory import CachedContacts, CachedDirectory
from adapters.cached_reads import CachedChats, CachedMessages, CacheHealth
from adapters.clamd import ClamdScanner
from adapters.event_outbox import EventOutbox
from adapters.event_relay import EventRelay
from adapters.kafka_events import EventPublisher
from adapters.kafka_ingress import IngressConsumer
from adapters.mailfiles import MailDirChannel
from adapters.objects import LocalObjectStore, S3ObjectStore
from adapters.postgres.attachments import PostgresAttachments
from adapters.postgres.chats import PostgresChats
from adapters.postgres.connect import open_pool, resolve_dsn
from adapters.postgres.messages import PostgresMessages
from adapters.postgres.migrations import migrate, require_current
from adapters.postgres.notifications import NotificationsStore
from adapters.postgres.outbox import PostgresOutbox
from adapters.redis_cache import ChatCache
from adapters.smtp import SmtpChannel
from cluster.credit_lease import LeasedCredits
from cluster.credits import CreditBankClient
from cluster.dedup import DedupClient
from cluster.hub import HubClient
from cluster.ratelimit import SharedRateGate
from deployments.notifications.kick import HandleKick
from deployments.services import ChatServices, NotificationServices, SoftCheck
from serve_app.openapi import docs_routes
from serve_app.web import web_client_routes
from settings import Settings
from stages.builtin import default_registry
from stages.bus import CacheUnavailable, IngressHandler
from stages.notifications import Channel, CircuitBreaker, GuardedChannel, Limits
from stages.ports import (
    AttachmentLimits,
    ChatStore,
    CreditBank,
    MessageStore,
    NotificationLimits,
    Ports,
    RateGate,
    SignalLimits,
    StageDefaults,
)
from stages.resolver import Resolver, StageRegistry

log = logging.getLogger("conveyor.bootstrap")
PIPELINES_FILE = Path(__file__).with_name("pipelines.yaml")
Check = Callable[[], Awaitable[Any]]


def load_resolver(settings: Settings, registry: StageRegistry | None = None) -> Resolver:
    path = settings.pipelines_file or PIPELINES_FILE
    return Resolver.from_yaml(Path(path), registry or default_registry())


def stage_defaults(s: Settings) -> StageDefaults:
    return StageDefaults(
        attachments=AttachmentLimits(s.attachment_max_bytes, tuple(s.attachment_types),
                                     s.attachment_upload_ttl_s, s.attachment_claim_lease_s),
        notifications=NotificationLimits(s.notification_max_contacts,
                                         s.notification_max_message_chars),
        signals=SignalLimits(s.signal_scope))


def verifier(s: Settings) -> JwtVerifier:
    """RS256 tokens from the issuer's JWKS, or from the dev key when no JWKS is set."""
    common: dict[str, Any] = dict(issuer=s.jwt_issuer or None, audience=s.jwt_audience,
                                  client_id=s.jwt_client_id, leeway_s=s.jwt_leeway_s)
    if s.jwks_url:
        return JwtVerifier(jwks=JwksKeys(s.jwks_url, s.jwks_cache_s, s.jwks_min_refetch_s,
                                         s.jwks_timeout_s), **common)
    return JwtVerifier(dev_key=DevKey(s.data_dir), **common)


def credit_bank(s: Settings) -> CreditBank:
    """The sharded bank, behind a per-process lease of each active user's credits."""
    bank = CreditBankClient(s.credit_shards, s.credit_capacity, s.credit_refill,
                            s.credit_interval_s, s.state_actor_prefix)
    return (LeasedCredits(bank, s.credit_lease, s.credit_lease_idle_s, s.credit_lease_max)
            if s.credit_lease else bank)


def object_store(s: Settings) -> S3ObjectStore | LocalObjectStore:
    if s.s3_endpoint:
        return S3ObjectStore(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket,
                             s.s3_region, s.s3_secure)
    return LocalObjectStore.from_data_dir(s.data_dir, s.public_base_url)


def bitrix_gate(s: Settings) -> RateGate:
    """Cluster-wide (one actor books every process's requests) when running on Ray and
    ``bitrix_shared_limit`` is on, else per process."""
    local = local_gate(s.bitrix_rate_per_s, s.bitrix_burst)
    if not s.bitrix_shared_limit or not ray.is_initialized():
        return local
    return SharedRateGate(s.bitrix_rate_per_s, s.bitrix_burst, local)


def channels(s: Settings) -> tuple[dict[str, Channel], dict[str, Check]]:
    """(channels by contact type, each behind a circuit breaker; their readiness checks)."""
    checks: dict[str, Check] = {}
    email: Channel
    if s.smtp_host:
        smtp = SmtpChannel(s.smtp_host, s.smtp_port, mail_from=s.mail_from,
                           subject=s.mail_subject, username=s.smtp_username,
                           password=s.smtp_password, use_tls=s.smtp_use_tls,
                           start_tls=s.smtp_starttls, timeout_s=s.smtp_timeout_s,
                           pool_size=s.smtp_pool_size)
        email, checks["smtp"] = smtp, smtp.ping
    else:
        folder = MailDirChannel(s.mail_path, s.mail_from, s.mail_subject)
        email, checks["mail_dir"] = folder, folder.ping
    raw: dict[str, Channel] = {"email": email}
    if s.bitrix_webhook_url:
        bitrix = BitrixChannel(s.bitrix_webhook_url, rate_per_s=s.bitrix_rate_per_s,
                               burst=s.bitrix_burst, timeout_s=s.bitrix_timeout_s,
                               gate=bitrix_gate(s))
        raw["bitrix"], checks["bitrix"] = bitrix, bitrix.ping
    guarded: dict[str, Channel] = {
        kind: GuardedChannel(ch, CircuitBreaker(s.breaker_failures, s.breaker_reset_s))
        for kind, ch in raw.items()}
    return guarded, checks


_pools: dict[tuple[str, int], Any] = {}  # one pool per database and event loop, per process


async def open_database(s: Settings) -> Any:
    """The process's pool on the configured (or embedded) PostgreSQL, whose schema must
    be current (``SchemaOutdated`` otherwise). Services of one process share it."""
    dsn = await resolve_dsn(s.database_url, s.data_dir)
    key = (dsn, id(asyncio.get_running_loop()))
    pool = _pools.get(key)
    if pool is None:
        pool = await open_pool(dsn, s.db_pool_min, s.db_pool_max)
        try:
            await require_current(pool)
        except BaseException:
            await pool.close()
            raise
        _pools[key] = pool
    return pool


async def migrate_database(s: Settings) -> list[str]:
    """Apply pending migrations (under the advisory lock); returns what was applied."""
    dsn = await resolve_dsn(s.database_url, s.data_dir)
    pool = await open_pool(dsn, 1, 1)
    try:
        return await migrate(pool)
    finally:
        await pool.close()


@dataclass(frozen=True)
class ProcessWiring:
    """What ``build_app`` binds into every deployment: the settings. Picklable; each
    replica opens its own connections with it (see ``deployments.services.Wiring``)."""

    args: dict[str, Any]

    @property
    def settings(self) -> Settings:
        return Settings(**self.args)

    async def open_chat(self) -> ChatServices:
        s = self.settings
        pool = await open_database(s)
        pg_chats = PostgresChats(pool)
        # With an event bus, every commit appends its events to the events outbox too.
        pg_messages = PostgresMessages(pool, events_enabled=bool(s.kafka_bootstrap))
        chats: ChatStore = pg_chats
        messages: MessageStore = pg_messages
        outbox, attachments = PostgresOutbox(pool), PostgresAttachments(pool)
        directory = CachedDirectory(pg_chats, s.membership_cache_s)
        # Who shares a chat with whom: presence frames, signals, presence lookups.
        contacts = CachedContacts(pg_chats, s.membership_cache_s)
        cache, cache_state, soft = chat_cache(s)
        if cache is not None and cache_state is not None:
            chats = CachedChats(pg_chats, cache, cache_state)
            messages = CachedMessages(pg_messages, cache, cache_state)
        hub = HubClient(s.hub_shards, s.gateway_ttl_s, s.state_actor_prefix)
        objects = object_store(s)
        registry = default_registry()
        tokens = verifier(s)
        ports = Ports(
            store=messages, outbox=outbox, directory=directory, contacts=contacts, hub=hub,
            credits=credit_bank(s),
            dedup=DedupClient(s.dedup_shards, s.signal_dedup_ttl_s, s.state_actor_prefix),
            objects=objects, attachments=attachments,
            scanner=(ClamdScanner(s.clamd_address, s.clamd_timeout_s)
                     if s.clamd_address else None),
            cache=cache, defaults=stage_defaults(s))
        checks: dict[str, Check] = {"database": pg_chats.ping, "hub": hub.stats,
                                    "objects": objects.ping}
        if tokens.jwks is not None:
            checks["jwks"] = tokens.jwks.check
        return ChatServices(
            settings=s, chats=chats, messages=messages, outbox=outbox, directory=directory,
            hub=hub, attachments=attachments, objects=objects,
            uploads=objects if isinstance(objects, LocalObjectStore) else None,
            registry=registry, resolver=load_resolver(s, registry), ports=ports,
            verifier=tokens, checks=checks,
            routes=[*docs_routes(s), *web_client_routes(s, tokens.dev_key)],
            soft_checks=soft, cache=cache_state)

    async def open_notifications(self, dispatcher: Any | None = None) -> NotificationServices:
        """The notification service's: ``dispatcher`` (the dispatcher deployment's handle,
        given to the gateway) receives immediate notifications; the dispatcher itself
        passes none."""
        s = self.settings
        pool = await open_database(s)
        store = NotificationsStore(pool, events_enabled=bool(s.kafka_bootstrap))
        guarded, checks = channels(s)
        if dispatcher is not None:
            checks["notification_dispatcher"] = lambda: dispatcher.ping.remote()
        return NotificationServices(
            settings=s, store=store, queue=store, channels=guarded,
            kick=HandleKick(dispatcher) if dispatcher is not None else None,
            checks=checks)


    async def open_events(self) -> EventRelay:
        """The event relay: the events outbox to ``kafka_events_topic`` (acks=all)."""
        s = self.settings
        if not s.kafka_bootstrap:
            raise ValueError("the event relay needs kafka_bootstrap")
        pool = await open_database(s)
        publisher = EventPublisher(s.kafka_bootstrap, s.kafka_events_topic,
                                   timeout_s=s.kafka_timeout_s)
        return EventRelay(EventOutbox(pool), publisher, batch=s.event_relay_batch,
                          lease_s=s.event_relay_lease_s, idle_s=s.event_relay_interval_s,
                          backoff_max_s=s.event_relay_backoff_max_s)

    def open_ingress(self, handler: IngressHandler, saturated: Callable[[], Any]
                     ) -> IngressConsumer:
        """A consumer of ``kafka_ingress_topic`` in ``kafka_ingress_group``."""
        s = self.settings
        if not s.kafka_bootstrap:
            raise ValueError("the Kafka ingress needs kafka_bootstrap")
        return IngressConsumer(
            s.kafka_bootstrap, s.kafka_ingress_topic, s.kafka_ingress_group, handler,
            dlq_topic=s.kafka_ingress_dlq_topic, saturated=saturated,
            max_batch=s.kafka_ingress_batch, retry_s=s.kafka_ingress_retry_s,
            limits=Limits(s.notification_max_contacts, s.notification_max_message_chars),
            timeout_s=s.kafka_timeout_s)


def chat_cache(s: Settings) -> tuple[ChatCache | None, CacheHealth | None, dict[str, SoftCheck]]:
    """(the chat cache, its state, its soft readiness check), or none of them without
    ``redis_url``: reads then go to PostgreSQL as always."""
    if not s.redis_url:
        return None, None, {}
    cache = ChatCache(s.redis_url, max_messages=s.cache_chat_messages, ttl_s=s.cache_ttl_s,
                      timeout_s=s.redis_timeout_s)
    state = CacheHealth()

    async def redis_check() -> dict[str, Any]:
        detail: dict[str, Any] = {"hits": state.hits, "misses": state.misses,
                                  "unavailable": state.unavailable}
        try:
            await cache.ping()
        except CacheUnavailable as exc:
            state.failed(exc)
            return {"status": "degraded", "error": str(exc)[:200], **detail}
        state.ok()
        return {"status": "up", **detail}

    return cache, state, {"redis": redis_check}


def migrate_now(s: Settings) -> list[str]:
    """``migrate_database`` from synchronous code (``build_app``, the CLI); in a thread of
    its own when the caller already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(migrate_database(s))
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, migrate_database(s)).result()
