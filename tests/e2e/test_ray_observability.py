"""Conveyor's metrics reach Ray's metrics pipeline: after traffic on the session app, the
metrics agents Ray lists for Prometheus (its service-discovery file, or the same targets
built from the node table as Ray's writer builds them when the session runs without a
dashboard) export ``ray_conveyor_*`` beside Serve's ``ray_serve_*``, and every metric a
panel of the shipped Grafana dashboard queries exists there. The Prometheus config reads
that service-discovery file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from client import WsClient, create_chat
from tests.client import chat_of_two, user
from tests.conftest import App

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "conveyor.json"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"


def dashboard_metrics() -> set[str]:
    """Every series name a panel's query reads."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    names: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            names |= set(re.findall(r"\b(ray_[a-z0-9_]+)", target["expr"]))
    return names


def discovery_targets() -> tuple[list[str], str]:
    """host:port of every node's metrics agent, from Ray's service-discovery file of this
    session if it has one; else built as Ray's writer builds it (alive nodes' metrics
    export ports), since the session's Ray runs without the dashboard that writes it."""
    import ray

    node = ray._private.worker._global_node
    for path in (Path(node.get_session_dir_path()) / DISCOVERY_FILE,):
        if path.exists():
            groups = json.loads(path.read_text())
            return [t for g in groups for t in g["targets"]], str(path)
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["alive"]]
    return [f"127.0.0.1:{p}" for p in ports], "ray.nodes()"


LE: set[str] = set()  # bucket bounds seen on ray_conveyor_stage_seconds_bucket


def scrape_agents(targets: list[str]) -> set[str]:
    names: set[str] = set()
    for target in targets:
        port = target.rsplit(":", 1)[1]
        with contextlib.suppress(httpx.HTTPError):  # the dashboard's target may be absent
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                names |= {s.name for s in family.samples}
                LE.update(s.labels["le"] for s in family.samples
                          if s.name == "ray_conveyor_stage_seconds_bucket" and "le" in s.labels)
    return names


async def provoke_credit_rejections(app: App) -> int:
    """One sender well past its credits (the default bucket holds 100)."""
    sender, other = user("greedy"), user()
    chat = await create_chat(app.base_url, app.token(sender), [other])
    async with await WsClient.connect(app.ws_url, app.token(sender)) as c:
        ids = [await c.chat(chat, f"m{i}") for i in range(130)]
        acks = [await c.ack(i, timeout=30) for i in ids]
    return sum(1 for a in acks if (a.get("error") or {}).get("code") == "credits_exhausted")


async def flood_signals(app: App, frames: int = 600, sockets: int = 4) -> None:
    """Signals (droppable) faster than the small e2e buffer takes them."""
    target = user("quiet")
    flooders = [user("flood") for _ in range(sockets)]
    await create_chat(app.base_url, app.token(target), flooders)  # signals go to contacts
    clients = [await WsClient.connect(app.ws_url, app.token(u)) for u in flooders]
    try:
        async def burst(c: WsClient) -> None:
            for i in range(frames):
                await c.send({"type": "signal", "id": f"f{i}", "to": target, "payload": {"n": i}})

        await asyncio.gather(*(burst(c) for c in clients))
        await asyncio.gather(*(c.drain(1.0) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def drops_counted(app: App) -> bool:
    async with httpx.AsyncClient(base_url=app.base_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    return any(s.name == "conveyor_dropped_total" and s.value > 0
               for f in text_string_to_metric_families(text) for s in f.samples)


async def test_dashboard_metrics_are_exported_by_rays_metrics_agents(conveyor: App) -> None:
    # Traffic that moves every panel: chat, receipts, signals, credit refusals, drops.
    chat, _, bob, a, b = await chat_of_two(conveyor)
    for i in range(5):
        await a.ack(await a.chat(chat, f"m{i}"))
    msg = await b.message(seq=5)
    await b.receipt([msg["messageId"]], "read")
    await a.request({"type": "signal", "to": bob, "payload": {"typing": True}})
    assert await provoke_credit_rejections(conveyor) > 0
    for _ in range(5):
        if await drops_counted(conveyor):
            break
        await flood_signals(conveyor)
    assert await drops_counted(conveyor), "no drop happened: the dashboard's drop panel has no series"

    wanted = dashboard_metrics()
    assert {"ray_conveyor_messages_in_total", "ray_conveyor_stage_seconds_bucket",
            "ray_serve_deployment_replica_healthy"} <= wanted
    targets, source = discovery_targets()
    assert targets, source
    seen: set[str] = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # The app's /metrics reads the scrape-time gauges and hands them to Ray's pipeline.
        async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=30) as http:
            assert (await http.get("/metrics")).status_code == 200
        seen = await asyncio.to_thread(scrape_agents, targets)
        if wanted <= seen:
            break
        await asyncio.sleep(3)
    await a.close()
    await b.close()
    missing = sorted(wanted - seen)
    assert not missing, (missing, source, sorted(n for n in seen if n.startswith("ray_serve")))
    # Histograms arrive with their bucket bounds, as histogram_quantile() needs them.
    assert {"0.001", "0.1", "+Inf"} <= LE, sorted(LE)
    # Conveyor's series sit beside Ray's own, in the same scrape.
    assert any(n.startswith("ray_serve_") for n in seen)
    assert any(n.startswith("ray_node_") or n.startswith("ray_tasks") for n in seen)


def test_prometheus_config_scrapes_rays_service_discovery_file() -> None:
    config: dict[str, Any] = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    ray_job = next(j for j in config["scrape_configs"] if j["job_name"] == "ray")
    files = [f for sd in ray_job["file_sd_configs"] for f in sd["files"]]
    assert any(f.endswith("/" + DISCOVERY_FILE) for f in files)


def test_every_dashboard_panel_queries_prometheus() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("messages in per type", "stage latency", "batch size", "buffers", "drops",
                  "credit", "outbox", "delivery", "connections", "replicas"):
        assert topic in titles, topic
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
