"""``build_app``: the Serve application graph, built once from settings.

``serve run serve_app/config.yaml`` (or ``serve deploy``) calls ``build_app(args)`` with
the config's ``args``; the deployments' replicas, autoscaling, ``max_ongoing_requests``
and CPU shares are in that YAML too. ``args.topology`` chooses how stages map onto
deployments:

- ``fused`` (default): one ``stages`` deployment hosts every stage of every pipeline;
- ``split``: one deployment per stage, as the design card draws it;
- or ``hosts: {stage_name: deployment_name, ...}`` for any other grouping.

Stages not listed (``ack``) run inside the gateway, which holds the senders' sockets.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from deployments.event_relay import EventRelay
from deployments.gateway import Gateway
from deployments.ingress import KafkaIngress
from deployments.notifications.dispatcher import NotificationDispatcher
from deployments.relay import OutboxRelay
from deployments.stage_host import StageHost
from serve_app.bootstrap import ProcessWiring, load_resolver, migrate_now
from settings import Settings

log = logging.getLogger("conveyor.app")

# Stages that run inside the gateway: they answer the sender or guard the entrance.
GATEWAY_STAGES = {"ack", "debit_credits", "track", "deliver_local"}
# The notification pipeline runs inside the gateway's POST /v1/notifications handler.
GATEWAY_STAGES |= {"validate_notification", "persist_notification", "route_notification"}
TOPOLOGIES = ("fused", "split")


def plan_hosts(settings: Settings, topology: str = "fused",
               hosts: dict[str, str] | None = None) -> dict[str, str]:
    """stage name -> deployment name, for every stage some pipeline uses."""
    resolver = load_resolver(settings)
    used = []
    for t in resolver.types:
        spec = resolver.spec(t)
        for s in spec.stages + tuple(s for v in spec.variants for s in v.stages):
            if s.name not in GATEWAY_STAGES and s.name not in used:
                used.append(s.name)
    if hosts:
        unknown = set(hosts) - set(used)
        if unknown:
            raise ValueError(f"hosts names stages no pipeline uses: {sorted(unknown)}")
        missing = [s for s in used if s not in hosts]
        if missing:
            raise ValueError(f"hosts does not place stages {missing}")
        return dict(hosts)
    if topology == "fused":
        return {s: "stages" for s in used}
    if topology == "split":
        return {s: s for s in used}
    raise ValueError(f"topology must be one of {TOPOLOGIES} (or give hosts)")


def build_app(args: dict[str, Any]) -> Application:
    """The application builder ``serve run`` / ``serve deploy`` call (one argument)."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | None = None,
                options: dict[str, dict[str, Any]] | None = None) -> Application:
    """``options``: per-deployment ``.options()`` overrides by deployment name, for code
    that builds the app without a Serve config (tests, notebooks, benchmarks)."""
    args = dict(args or {})
    options = options or {}
    topology = args.pop("topology", "fused")
    hosts_arg = args.pop("hosts", None)
    settings = Settings(**args)
    hosts = plan_hosts(settings, topology, hosts_arg)
    # The schema is brought up to date once per deploy, here, not by every replica.
    applied = migrate_now(settings)
    if applied:
        log.info("applied migrations %s", applied)
    wiring = ProcessWiring(settings.to_args())
    by_host: dict[str, list[str]] = {}
    for stage, host in hosts.items():
        by_host.setdefault(host, []).append(stage)
    handles = {
        host: StageHost.options(name=host, **options.get(host, {})).bind(wiring, stages)
        for host, stages in by_host.items()
    }
    handles["relay"] = OutboxRelay.options(**options.get("OutboxRelay", {})).bind(wiring)
    notifier = NotificationDispatcher.options(
        **options.get("NotificationDispatcher", {})).bind(wiring)
    # The event bus (out) and the Kafka ingress (in) exist only with a broker configured.
    bus: dict[str, Any] = {}
    if settings.kafka_bootstrap:
        bus["event_relay"] = EventRelay.options(**options.get("EventRelay", {})).bind(wiring)
        stage_handles = {h: d for h, d in handles.items() if h != "relay"}
        bus["kafka_ingress"] = KafkaIngress.options(**options.get("KafkaIngress", {})).bind(
            wiring, hosts, stage_handles, notifier)
    return Gateway.options(**options.get("Gateway", {})).bind(wiring, hosts, handles, notifier,
                                                              bus)
