"""The composition root: the one place that picks adapters from settings.

Every deployment calls :func:`open_services` in its constructor and gets the same ports,
so a stage runs the same code in a unit test (with fakes), in one fused deployment, or
spread across many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from adapters.clamd import ClamdScanner
from adapters.objects import LocalObjectStore, S3ObjectStore
from adapters.postgres import (
    CachedDirectory,
    PostgresAttachments,
    PostgresStore,
    migrate,
    open_pool,
    resolve_dsn,
)
from cluster.credits import CreditBankClient
from cluster.dedup import DedupClient
from cluster.hub import HubClient
from settings import Settings
from stages.builtin import default_registry
from stages.resolver import Resolver, StageRegistry

PIPELINES_FILE = Path(__file__).with_name("pipelines.yaml")


def load_resolver(settings: Settings, registry: StageRegistry | None = None) -> Resolver:
    path = settings.pipelines_file or PIPELINES_FILE
    return Resolver.from_yaml(Path(path), registry or default_registry())


@dataclass
class Services:
    settings: Settings
    pool: asyncpg.Pool
    store: PostgresStore
    directory: CachedDirectory
    hub: HubClient
    credits: CreditBankClient
    dedup: DedupClient
    objects: S3ObjectStore | LocalObjectStore
    attachments: PostgresAttachments
    scanner: ClamdScanner | None
    registry: StageRegistry
    resolver: Resolver
    extra: dict[str, Any] = field(default_factory=dict)

    def ports(self, **more: Any) -> dict[str, Any]:
        return {"store": self.store, "directory": self.directory, "contacts": self.store,
                "hub": self.hub, "credits": self.credits, "dedup": self.dedup,
                "objects": self.objects, "attachments": self.attachments,
                "scanner": self.scanner, "settings": self.settings, **self.extra, **more}

    async def close(self) -> None:
        await self.pool.close()


def object_store(settings: Settings) -> S3ObjectStore | LocalObjectStore:
    if settings.s3_endpoint:
        return S3ObjectStore(settings.s3_endpoint, settings.s3_access_key,
                             settings.s3_secret_key, settings.s3_bucket, settings.s3_region,
                             settings.s3_secure)
    return LocalObjectStore.from_data_dir(settings.data_dir, settings.public_base_url)


async def open_services(settings: Settings) -> Services:
    dsn = await resolve_dsn(settings.database_url, settings.data_dir)
    pool = await open_pool(dsn, settings.db_pool_min, settings.db_pool_max)
    await migrate(pool)
    store = PostgresStore(pool)
    registry = default_registry()
    return Services(
        settings=settings,
        pool=pool,
        store=store,
        directory=CachedDirectory(store, settings.membership_cache_s),
        hub=HubClient(settings.hub_shards, settings.gateway_ttl_s),
        credits=CreditBankClient(settings.credit_shards, settings.credit_capacity,
                                 settings.credit_refill, settings.credit_interval_s),
        dedup=DedupClient(settings.dedup_shards, settings.signal_dedup_ttl_s),
        objects=object_store(settings),
        attachments=PostgresAttachments(pool),
        scanner=(ClamdScanner(settings.clamd_address, settings.clamd_timeout_s)
                 if settings.clamd_address else None),
        registry=registry,
        resolver=load_resolver(settings, registry),
    )
