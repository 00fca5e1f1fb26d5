"""Cluster-wide metrics for ``GET /metrics`` (Prometheus text format, by ``prometheus_client``).

Every process (gateway replica, stage host, relay) records into a local ``Recorder`` and
pushes deltas every ``metrics_push_s`` to the ``Telemetry`` actor, which sums counters and
histograms across processes and keeps each process's latest gauges (a process silent for
``gauge_ttl_s`` drops out). Any gateway replica can then answer a scrape for the whole
cluster. Losing the actor loses history: counters restart from zero, which Prometheus
treats as a counter reset. Ray's own metrics (Serve, actors) are exported by each node's
metrics agent as usual.

Every process also records the same metrics through Ray's metrics pipeline
(``ray.util.metrics``, see :class:`RayMetrics`), so each node's metrics agent exports them
beside Ray's and Serve's own, prefixed ``ray_`` (``conveyor_buffer_depth`` →
``ray_conveyor_buffer_depth``, ``conveyor_acks_total`` → ``ray_conveyor_acks_total``,
histograms as ``ray_..._bucket``/``_sum``/``_count``), each series tagged with the node and
worker besides Conveyor's labels: one Prometheus scrape, through Ray's service-discovery file, sees everything
(``monitoring/``). Everything is handed over at each push, not per event: counter deltas,
gauges, and histograms as their cumulative bucket counts (``_bucket{le=...}``, ``_sum``,
``_count``, the series a Prometheus histogram has) — one Ray ``Histogram.observe`` costs
~13 µs here, which per message would come out of the throughput. The gauges read at scrape
time go over with each ``/metrics`` scrape.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from cluster.sharding import named_actor

log = logging.getLogger("conveyor.metrics")
Labels = tuple[tuple[str, str], ...]
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> (type, help). Every one has a row in the README's metrics table (a unit test
# checks both ways); e2e tests check the counters move.
METRICS: dict[str, tuple[str, str]] = {
    "conveyor_messages_in_total": ("counter", "Client frames accepted into a gateway buffer, by type."),
    "conveyor_messages_out_total": ("counter", "Frames written to client sockets, by frame type."),
    "conveyor_acks_total": ("counter", "Acks sent to senders, by message type and status."),
    "conveyor_stage_seconds": ("histogram", "Time one stage took for one batch, by stage."),
    "conveyor_batch_size": ("histogram", "Items per batch sent down a pipeline, by type."),
    "conveyor_buffer_depth": ("gauge", "Items waiting in a gateway's inbound buffer, by type and replica."),
    "conveyor_dropped_total": ("counter", "Items dropped on purpose, by type, stage and reason."),
    "conveyor_credit_rejections_total": ("counter", "Messages refused for lack of credits, by type."),
    "conveyor_stage_retries_total": ("counter", "Durable batches retried after a stage refused or failed."),
    "conveyor_overload_total": ("counter", "Times a gateway paused reading a socket: buffer full."),
    "conveyor_deliveries_unreceipted": ("gauge", "Messages sent to sockets, not yet receipted."),
    "conveyor_redeliveries_total": ("counter", "Redeliveries after missing receipts."),
    "conveyor_connections": ("gauge", "Open WebSocket connections, by gateway replica."),
    "conveyor_connections_refused_total": ("counter", "WebSocket connections refused by a "
                                           "per-user cap, by close code."),
    "conveyor_slow_consumers_total": ("counter", "Connections closed as slow consumers (4408)."),
    "conveyor_users_online": ("gauge", "Users with at least one live connection."),
    "conveyor_hub_mailbox_depth": ("gauge", "Frames waiting in the hub for gateways to pull."),
    "conveyor_deliveries_pending": ("gauge", "Messages stored and not yet receipted, summed over "
                                    "chat members, online or not (what a reconnect replays)."),
    "conveyor_delivery_lag_seconds": ("gauge", "Age of the oldest stored message some member "
                                      "has not receipted yet."),
    "conveyor_outbox_pending": ("gauge", "Outbox entries not yet handed to delivery."),
    "conveyor_outbox_lag_seconds": ("gauge", "Age of the oldest pending outbox entry."),
    "conveyor_relay_batch": ("gauge", "Outbox relay batch size chosen by the feedback loop."),
    "conveyor_message_events_total": ("counter", "Analytics events: accepted, delivered, read."),
    "conveyor_hop_seconds": ("histogram", "Wall time of each hop of a message's path, by hop: "
                             "queue (gateway buffer), call:<host> (a stage-host call), ack "
                             "(received to ack written), deliver (commit to recipient socket)."),
    "conveyor_unavailable_total": ("counter", "Items that passed a dependency unchecked, or "
                                   "calls that failed, because it was unreachable, by "
                                   "dependency (credits, dedup, hub) and stage."),
    "conveyor_message_latency_seconds": ("histogram", "Accepted: receive to ack; delivered/read: "
                                          "stored to receipt."),
    # The event bus, the Kafka ingress and the chat cache (only when configured).
    "conveyor_event_outbox_pending": ("gauge", "Committed events not yet acknowledged by the "
                                      "broker (waiting in the events outbox)."),
    "conveyor_event_outbox_lag_seconds": ("gauge", "Age of the oldest event waiting in the "
                                          "events outbox."),
    "conveyor_event_relay_degraded": ("gauge", "1 while the event relay cannot publish (the "
                                      "broker is down or refusing): events wait, chat goes on."),
    "conveyor_events_published_total": ("counter", "Events the broker acknowledged."),
    "conveyor_ingress_records_total": ("counter", "Kafka ingress records, by result: accepted, "
                                       "dead_lettered, refused (read again later)."),
    "conveyor_ingress_paused": ("gauge", "1 while the Kafka ingress has its partitions paused "
                                "(the pipeline is saturated)."),
    "conveyor_ingress_pauses_total": ("counter", "Times the Kafka ingress paused its partitions."),
    "conveyor_cache_available": ("gauge", "1 while a process reaches the chat cache (Redis); 0: "
                                 "it reads PostgreSQL instead, by process."),
    "conveyor_cache_reads_total": ("counter", "Cache-backed reads (history, sync, chat list), by "
                                   "result: hit, miss (PostgreSQL answered)."),
    # Emitted by the notification dispatcher (deployments/notifications.py).
    "conveyor_notification_attempts_total": ("counter", "Notification delivery attempts, by "
                                             "channel and status."),
    "conveyor_notifications_final_total": ("counter", "Notifications that reached a final state, "
                                           "by state."),
    "conveyor_notification_retries_total": ("counter", "Notifications left for another round "
                                            "after a transient failure."),
    "conveyor_notification_round_seconds": ("histogram", "Time one dispatch round took "
                                            "(send and record)."),
}


def labels(**kv: Any) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in kv.items()))


class RayMetrics:
    """Conveyor's metrics through Ray's metrics pipeline (``ray.util.metrics``): one Ray
    ``Counter`` or ``Gauge`` per name and set of label keys, created on first use, tagged
    with the labels; a histogram as gauges holding its process's cumulative bucket counts
    (``rate()`` and ``histogram_quantile()`` read them as they read a histogram's). Only in
    a process connected to Ray; if Ray refuses a metric it is logged once and skipped, never
    raised into the caller."""

    def __init__(self) -> None:
        self._metrics: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._enabled: bool | None = None
        self._refused: set[str] = set()

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = ray.is_initialized()
        return self._enabled

    def _metric(self, kind: str, name: str, keys: tuple[str, ...], family: str) -> Any:
        metric = self._metrics.get((name, keys))
        if metric is None and name not in self._refused:
            from ray.util import metrics as ray_metrics

            help_text = METRICS.get(family, ("", ""))[1] or family
            try:
                if kind == "counter":
                    metric = ray_metrics.Counter(name, help_text, keys)
                else:
                    metric = ray_metrics.Gauge(name, help_text, keys)
            except Exception as exc:
                self._refused.add(name)
                log.warning("metric %s not recorded through Ray: %r", name, exc)
                return None
            self._metrics[(name, keys)] = metric
        return metric

    def _record(self, kind: str, name: str, lb: Labels, value: float, family: str = "") -> None:
        if not self.enabled:
            return
        metric = self._metric(kind, name, tuple(k for k, _ in lb), family or name)
        if metric is None:
            return
        tags = dict(lb)
        try:
            if kind == "counter":
                if value > 0:
                    metric.inc(value, tags)
            else:
                metric.set(value, tags)
        except Exception as exc:
            if name not in self._refused:
                self._refused.add(name)
                log.warning("metric %s not recorded through Ray: %r", name, exc)

    def counters(self, deltas: dict[tuple[str, Labels], float]) -> None:
        for (name, lb), v in deltas.items():
            self._record("counter", name, lb, v)

    def gauges(self, values: dict[tuple[str, Labels], float]) -> None:
        for (name, lb), v in values.items():
            self._record("gauge", name, lb, finite(v))

    def histograms(self, cumulative: dict[tuple[str, Labels], list[float]]) -> None:
        """Each histogram's cumulative per-bucket counts (``BUCKETS``, +Inf, then the sum)."""
        for (name, lb), h in cumulative.items():
            running = 0.0
            for bound, n in zip((*BUCKETS, math.inf), h, strict=False):
                running += n
                self._record("gauge", f"{name}_bucket", (*lb, ("le", floatToGoString(bound))),
                             running, name)
            self._record("gauge", f"{name}_count", lb, running, name)
            self._record("gauge", f"{name}_sum", lb, h[-1], name)


class Recorder:
    """Process-local metrics; ``drain()`` hands over what accumulated since last time.
    ``drain_for_ray()`` hands the same over to Ray's pipeline, kept apart so that a push
    retried to the Telemetry actor is not counted twice there."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, Labels], float] = defaultdict(float)
        self.hist: dict[tuple[str, Labels], list[float]] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.ray = RayMetrics()
        self._ray_counters: dict[tuple[str, Labels], float] = defaultdict(float)
        self._ray_hist: dict[tuple[str, Labels], list[float]] = {}  # cumulative, never drained

    def inc(self, name: str, value: float = 1.0, **kv: Any) -> None:
        key = (name, labels(**kv))
        self.counters[key] += value
        self._ray_counters[key] += value

    def observe(self, name: str, value: float, **kv: Any) -> None:
        key = (name, labels(**kv))
        for table in (self.hist, self._ray_hist):
            h = table.get(key)
            if h is None:
                h = table[key] = [0.0] * (len(BUCKETS) + 2)  # buckets..., +Inf, sum
            for i, b in enumerate(BUCKETS):
                if value <= b:
                    h[i] += 1
                    break
            else:
                h[len(BUCKETS)] += 1
            h[-1] += value

    def set(self, name: str, value: float, **kv: Any) -> None:
        self.gauges[(name, labels(**kv))] = value

    def drain(self) -> tuple[dict[Any, float], dict[Any, list[float]], dict[Any, float]]:
        counters, self.counters = dict(self.counters), defaultdict(float)
        hist, self.hist = self.hist, {}
        return counters, hist, dict(self.gauges)

    def drain_for_ray(self) -> None:
        """Counter deltas since the last call, the current gauges and the histograms'
        cumulative counts, to Ray's pipeline."""
        counters, self._ray_counters = self._ray_counters, defaultdict(float)
        self.ray.counters(counters)
        self.ray.gauges(self.gauges)
        self.ray.histograms(self._ray_hist)


# How each kind of metric is built by the library; "unknown" is exported as untyped.
_FAMILIES: dict[str, type[Metric]] = {
    "counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily, "unknown": UnknownMetricFamily,
}


def _scalar_samples(kind: str, name: str, lb: Labels, value: float) -> list[Sample]:
    """One counter, gauge or untyped series, named as the library names it (``_total``
    on counters)."""
    family: Any = _FAMILIES[kind](name, "", labels=[k for k, _ in lb])
    family.add_metric([v for _, v in lb], value)
    return list(family.samples)


def _histogram_samples(name: str, lb: Labels, h: list[float]) -> list[Sample]:
    """One histogram series from the recorder's per-bucket counts (``BUCKETS``, +Inf, sum)."""
    family = HistogramMetricFamily(name, "", labels=[k for k, _ in lb])
    cumulative, buckets = 0.0, []
    for bound, n in zip((*BUCKETS, math.inf), h, strict=False):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric([v for _, v in lb], buckets, h[-1])
    return list(family.samples)


class SnapshotCollector(Collector):
    """The cluster's merged metrics as ``prometheus_client`` families: declared metrics
    (``METRICS``) with their type and help, whatever else was recorded as untyped (or as a
    histogram if it was observed)."""

    def __init__(self, counters: dict[Any, float], hist: dict[Any, list[float]],
                 gauges: dict[Any, float]) -> None:
        self.scalars: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
        for (name, lb), v in sorted(counters.items()):
            self.scalars[name].append((lb, v))
        for (name, lb), v in sorted(gauges.items()):
            self.scalars[name].append((lb, v))
        self.hist: dict[str, list[tuple[Labels, list[float]]]] = defaultdict(list)
        for (name, lb), h in sorted(hist.items()):
            self.hist[name].append((lb, h))

    def collect(self) -> Iterable[Metric]:
        undeclared = sorted((set(self.scalars) | set(self.hist)) - set(METRICS))
        kinds = [(name, kind, help_text) for name, (kind, help_text) in METRICS.items()]
        kinds += [(name, "histogram" if name in self.hist else "unknown", "")
                  for name in undeclared]
        for name, kind, help_text in kinds:
            family = _FAMILIES[kind](name, help_text)
            if kind == "histogram":
                for lb, h in self.hist.get(name, []):
                    family.samples.extend(_histogram_samples(name, lb, h))
            else:
                for lb, v in self.scalars.get(name, []):
                    family.samples.extend(_scalar_samples(kind, name, lb, v))
            other = self.scalars if kind == "histogram" else self.hist
            if name in other:  # a coding error: one name, two kinds of series
                log.warning("metric %s has series of another kind than %s: not exported",
                            name, kind)
            yield family


def render(counters: dict[Any, float], hist: dict[Any, list[float]],
           gauges: dict[Any, float]) -> str:
    """The Prometheus text exposition of a merged snapshot, rendered by ``prometheus_client``
    (names, HELP, TYPE and label escaping are the library's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(counters, hist, gauges))
    return generate_latest(registry).decode("utf-8")


@ray.remote
class Telemetry:
    def __init__(self, gauge_ttl_s: float = 30.0) -> None:
        self.counters: dict[Any, float] = defaultdict(float)
        self.hist: dict[Any, list[float]] = {}
        self.gauges: dict[str, tuple[float, dict[Any, float]]] = {}
        self.gauge_ttl_s = gauge_ttl_s

    async def push(self, source: str, counters: dict[Any, float], hist: dict[Any, list[float]],
                   gauges: dict[Any, float]) -> None:
        for k, v in counters.items():
            self.counters[k] += v
        for k, h in hist.items():
            mine = self.hist.get(k)
            if mine is None:
                self.hist[k] = list(h)
            else:
                for i, v in enumerate(h):
                    mine[i] += v
        self.gauges[source] = (time.time(), gauges)

    async def snapshot(self) -> tuple[dict[Any, float], dict[Any, list[float]], dict[Any, float]]:
        now = time.time()
        merged: dict[Any, float] = {}
        for source, (at, gauges) in list(self.gauges.items()):
            if now - at > self.gauge_ttl_s:
                del self.gauges[source]
                continue
            merged.update(gauges)
        return dict(self.counters), {k: list(v) for k, v in self.hist.items()}, merged


class MetricsOutages:
    """The embedded ``Outages`` adapter: each report adds to ``conveyor_unavailable_total``
    and is logged (at most once a minute per dependency and stage)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._logged: dict[tuple[str, str], float] = {}

    def unavailable(self, dependency: str, stage: str, items: int) -> None:
        self.recorder.inc("conveyor_unavailable_total", items, dependency=dependency, stage=stage)
        now = time.monotonic()
        if now - self._logged.get((dependency, stage), -60.0) >= 60.0:
            self._logged[(dependency, stage)] = now
            log.warning("%s unreachable at %s: %d items passed unchecked", dependency, stage, items)


class MetricsAnalytics:
    """The embedded ``Analytics`` adapter: events become counters and latency histograms.
    (A Kafka adapter would publish the same events to a topic.)"""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def emit(self, events: Iterable[Any]) -> None:
        for e in events:
            self.recorder.inc("conveyor_message_events_total", kind=e.kind, type=e.type)
            if e.latency_s is not None:
                self.recorder.observe("conveyor_message_latency_seconds", max(e.latency_s, 0.0),
                                      kind=e.kind)


class MetricsPusher:
    """Owns a process's Recorder and pushes it to the Telemetry actor periodically."""

    def __init__(self, source: str, interval_s: float = 2.0) -> None:
        self.source = source
        self.interval_s = interval_s
        self.recorder = Recorder()
        self.actor = named_actor(Telemetry, "conveyor-telemetry")
        self._task: asyncio.Task[None] | None = None
        self.refresh: Callable[[Recorder], None] | None = None  # sets gauges before a push

    def observe_stage(self, stage: str, seconds: float, items: int) -> None:
        self.recorder.observe("conveyor_stage_seconds", seconds, stage=stage)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def flush(self) -> None:
        if self.refresh is not None:
            self.refresh(self.recorder)
        self.recorder.drain_for_ray()
        counters, hist, gauges = self.recorder.drain()
        try:
            await self.actor.push.remote(self.source, counters, hist, gauges)
        except Exception as exc:  # keep the deltas for the next push
            log.warning("metrics push failed: %r", exc)
            for k, v in counters.items():
                self.recorder.counters[k] += v
            for k, h in hist.items():
                mine = self.recorder.hist.setdefault(k, [0.0] * len(h))
                for i, v in enumerate(h):
                    mine[i] += v

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def scrape(self, live_gauges: dict[Any, float]) -> str:
        # The gauges read at scrape time (hub, outbox, delivery backlog) go to Ray's
        # pipeline too; the hub's shed counts are running totals, not deltas: not those.
        self.recorder.ray.gauges({k: v for k, v in live_gauges.items()
                                  if METRICS.get(k[0], ("",))[0] == "gauge"})
        await self.flush()
        counters, hist, gauges = await self.actor.snapshot.remote()
        gauges.update(live_gauges)
        return render(counters, hist, gauges)


def finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
