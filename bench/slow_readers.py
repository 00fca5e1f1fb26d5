"""Slow readers: what clients that never read cost the gateway and the Serve proxy.

``readers`` WebSocket clients connect and never read: their application takes no frame
and sends no receipt, while their client library keeps the socket drained (and answers
the proxy's keepalive pings). Each is a member of a group chat (at most ``GROUP``
readers per chat) into which a sender posts ``messages`` messages of ``body_chars``
characters; one healthy receiver reads and receipts everything of the first chat
meanwhile. Sampled: the resident memory (VmRSS) of the gateway replica(s) and of the
Serve proxy before the readers connect (``idle``), once they are connected
(``connected``), at the peak while messages are posted (``peak``) and after the readers
were closed (``after``); how the readers were closed (code 4408 after a ``system``
``slow_consumer`` frame, PROTOCOL.md) and how many distinct messages each got first.

Without a bound, every message would be written to every reader: ``addressedMiB`` says
how much that is. (A client whose TCP receive window stays full is another matter: Serve's
proxy holds what the gateway wrote for it, and its keepalive, a ping every 20 s answered
within 20 s, closes it; ``--stall`` lets the readers' library stop reading after 16 frames
to see that.)

    python -m bench.slow_readers --readers 1000 --messages 100 --body 4000

starts a local Ray (2 CPUs), an embedded PostgreSQL and the app (bench/chat.py's
``Spawned``; loopback only), runs once and prints the figures as JSON. Bounded: every wait
has a timeout, and everything it started is shut down when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psutil
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client import WsClient, create_chat

GROUP = 250            # readers per chat (a chat has at most 1,000 members)
CONNECT_BATCH = 50     # connections opened at once
INFLIGHT = 50          # unacked messages the sender keeps in flight
SAMPLE_S = 0.25        # RSS sampling period


def replica_pids(app: str) -> dict[str, int]:
    """Label -> pid of the gateway replicas of Serve application ``app`` and of the Serve
    proxy on this machine (from the cluster's actor table; needs a Ray connection)."""
    import ray

    out: dict[str, int] = {}
    for actor in ray._private.state.actors().values():
        if actor.get("State") != "ALIVE":
            continue
        name = actor.get("ActorClassName") or ""
        pid = int(actor.get("Pid") or 0)
        if name == f"ServeReplica:{app}:Gateway":
            out[f"gateway:{pid}"] = pid
        elif name == "ProxyActor":
            out[f"proxy:{pid}"] = pid
    return out


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for label, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            out[label] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    return out


@dataclass
class Reader:
    """A client that never reads until it is told to drain what the server sent."""

    user: str
    ws: ClientConnection | None = None
    messages: set[str] = field(default_factory=set)
    message_frames: int = 0
    slow_frame: bool = False
    close_code: int | None = None

    async def drain(self, timeout: float) -> None:
        """Read everything until the server's close (or ``timeout``)."""
        assert self.ws is not None
        try:
            async with asyncio.timeout(timeout):
                async for raw in self.ws:
                    frame = orjson.loads(raw)
                    if frame.get("type") == "message":
                        self.message_frames += 1
                        self.messages.add(frame["messageId"])
                    elif frame.get("type") == "system" and frame.get("event") == "slow_consumer":
                        self.slow_frame = True
        except (ConnectionClosed, TimeoutError):
            pass
        self.close_code = self.ws.close_code


class Sampler:
    """RSS of a set of processes every ``SAMPLE_S`` while running; keeps the peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for label, mib in rss_mib(self.pids).items():
                self.peak[label] = max(self.peak.get(label, 0.0), mib)
            await asyncio.sleep(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def open_reader(ws_url: str, token: str, stall: bool) -> ClientConnection:
    # stall: the library's default flow control (it stops reading the socket once 16
    # frames wait); otherwise it buffers whatever comes, unread by the application.
    return await websockets.connect(f"{ws_url}?access_token={token}", compression=None,
                                    open_timeout=60, max_size=None,
                                    max_queue=16 if stall else None)


async def healthy_receiver(client: WsClient, chat: str, expected: int, timeout: float
                           ) -> list[int]:
    """Reads and receipts every message of ``chat``; returns the seqs seen, in order."""
    seqs: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for raw in client.ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "message" and frame.get("chatId") == chat:
                    if frame["seq"] not in seqs:
                        seqs.append(frame["seq"])
                    await client.receipt([frame["messageId"]], "read")
                    if len(seqs) >= expected:
                        break
    return seqs


async def send_all(client: WsClient, chats: list[str], messages: int, body: str) -> int:
    """Posts ``messages`` messages into each chat with ``INFLIGHT`` unacked at most;
    returns how many were acked ``accepted``."""
    accepted = 0
    window = asyncio.Semaphore(INFLIGHT)
    pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def read_acks() -> None:
        async for raw in client.ws:
            frame = orjson.loads(raw)
            fut = pending.pop(frame.get("id", ""), None) if frame.get("type") == "ack" else None
            if fut is not None and not fut.done():
                fut.set_result(frame)

    reader = asyncio.create_task(read_acks())
    try:
        futures = []
        async with asyncio.timeout(240):
            for i in range(messages):
                for chat in chats:
                    await window.acquire()
                    fid = client.new_id()
                    fut = asyncio.get_running_loop().create_future()
                    fut.add_done_callback(lambda _f: window.release())
                    pending[fid] = fut
                    futures.append(fut)
                    await client.send({"type": "chat", "id": fid, "chatId": chat,
                                       "body": f"{i:07d} {body[8:]}"})
            for fut in futures:
                if (await fut).get("status") == "accepted":
                    accepted += 1
    finally:
        reader.cancel()
    return accepted


async def run(base_url: str, ws_url: str, token: Callable[[str], str], pids: dict[str, int], *,
              readers: int, messages: int, body_chars: int, slow_consumer_s: float,
              stall: bool = False, prefix: str = "sr") -> dict[str, Any]:
    """One run against a running app; figures as a dict (see the module's docstring)."""
    stamp = f"{prefix}{int(time.time() * 1000) % 10**8}"
    sender, healthy = f"{stamp}-sender", f"{stamp}-healthy"
    users = [f"{stamp}-r{i}" for i in range(readers)]
    groups = [users[i:i + GROUP] for i in range(0, readers, GROUP)]
    chats = [await create_chat(base_url, token(sender), [*g, *([healthy] if n == 0 else [])])
             for n, g in enumerate(groups)]
    slow = [Reader(u) for u in users]
    idle = rss_mib(pids)
    t0 = time.monotonic()
    for i in range(0, readers, CONNECT_BATCH):
        batch = slow[i:i + CONNECT_BATCH]
        sockets = await asyncio.gather(*(open_reader(ws_url, token(r.user), stall) for r in batch))
        for r, ws in zip(batch, sockets, strict=True):
            r.ws = ws
    connect_s = time.monotonic() - t0
    good = await WsClient.connect(ws_url, token(healthy))
    out_client = await WsClient.connect(ws_url, token(sender))
    try:
        await asyncio.sleep(1.0)
        connected = rss_mib(pids)
        body = "x" * body_chars
        t1 = time.monotonic()
        with Sampler(pids) as sampler:
            receiving = asyncio.create_task(healthy_receiver(good, chats[0], messages, 90))
            accepted = await send_all(out_client, chats, messages, body)
            seqs = await receiving
            send_s = time.monotonic() - t1
            # Every reader is closed once it was held back for slow_consumer_s.
            await asyncio.sleep(slow_consumer_s + 3.0)
        await asyncio.gather(*(r.drain(30.0) for r in slow))
        await asyncio.sleep(2.0)
        after = rss_mib(pids)
    finally:
        await good.close()
        await out_client.close()
        for r in slow:
            if r.ws is not None:
                with contextlib.suppress(Exception):
                    await r.ws.close()
    codes: dict[str, int] = {}
    for r in slow:
        codes[str(r.close_code)] = codes.get(str(r.close_code), 0) + 1
    return {
        "readers": readers, "stall": stall, "messagesPerChat": messages,
        "bodyChars": body_chars,
        "chats": len(chats),
        "addressedMiB": round(readers * messages * body_chars / 2**20, 1),
        "connectSeconds": round(connect_s, 1), "sendSeconds": round(send_s, 1),
        "accepted": accepted, "sent": messages * len(chats),
        "healthyReceived": len(seqs), "healthyInOrder": seqs == sorted(seqs),
        "closeCodes": codes,
        "slowConsumerFrames": sum(r.slow_frame for r in slow),
        "maxDistinctMessagesPerReader": max((len(r.messages) for r in slow), default=0),
        "maxMessageFramesPerReader": max((r.message_frames for r in slow), default=0),
        "rssMiB": {"idle": idle, "connected": connected, "peak": sampler.peak, "after": after},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.slow_readers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--readers", type=int, default=1000, help="clients that never read")
    p.add_argument("--messages", type=int, default=100, help="messages posted per chat")
    p.add_argument("--body", type=int, default=4000, help="characters per message body")
    p.add_argument("--window", type=int, default=20, help="connection_unreceipted_max")
    p.add_argument("--slow-consumer-s", type=float, default=5.0, help="slow_consumer_s")
    p.add_argument("--cpu", type=float, default=0.1, help="num_cpus per replica")
    p.add_argument("--shared", action="store_true",
                   help="run even while another Ray runs on this machine (noisier figures)")
    p.add_argument("--stall", action="store_true",
                   help="readers whose library stops reading the socket after 16 frames")
    return p.parse_args(argv)


async def _spawned(args: argparse.Namespace) -> dict[str, Any]:
    from bench.chat import APP_NAME, Spawned

    settings = {"connection_unreceipted_max": args.window, "slow_consumer_s": args.slow_consumer_s,
                "max_connections_per_user": 4}
    with Spawned(1, args.cpu, settings, shared=args.shared) as env:
        target = env.deploy_conveyor("fused")
        pids = replica_pids(APP_NAME)
        figures = await run(target.base_url, target.ws_url, target.token, pids,
                            readers=args.readers, messages=args.messages, body_chars=args.body,
                            slow_consumer_s=args.slow_consumer_s, stall=args.stall)
    return {"config": {**vars(args), "pids": pids}, **figures}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(asyncio.run(_spawned(args)), indent=2))


if __name__ == "__main__":
    main()
