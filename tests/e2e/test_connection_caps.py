"""Per-user caps on WebSocket connections hold cluster-wide (README settings table,
``deployments/gateway/limits.py``), with real sockets on the session app: two gateway
replicas, the default caps (32 open connections per user, 120 attempts per user and
minute), two hub shards.

Where each connection landed is the ``gateway`` of its ``connected`` frame. Both caps are
shown across the replicas: each replica holds fewer connections (took fewer attempts) than
the cap, so a cap per replica would have let the next one in.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import ray

from client import WsClient
from client.errors import HandshakeRefused
from cluster.sharding import shard_of
from settings import Settings
from tests.chaos.faults import kill_state_actor
from tests.client import user
from tests.conftest import App

pytestmark = pytest.mark.e2e

MAX_OPEN = int(Settings.model_fields["max_connections_per_user"].default)
PER_MINUTE = int(Settings.model_fields["connection_attempts_per_minute"].default)
REPLICAS = 2
ATTEMPTERS = 8          # concurrent attempts of one user in the attempt-cap test
ATTEMPTS_WITHIN_S = 45  # past this the test gives up waiting for a refusal


async def refused(app: App, who: str) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as info:
        client = await WsClient.connect(app.ws_url, app.token(who))
        await client.close()
    return info.value


async def connect_when_room(app: App, who: str, timeout_s: float = 5.0) -> WsClient:
    """Connects once a slot is free again: a close reaches the hub shortly after the
    client's close (the gateway detaches the socket when its read loop ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await WsClient.connect(app.ws_url, app.token(who))
        except HandshakeRefused as err:
            if err.code != 4409 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def open_until_refused(app: App, who: str, held: list[WsClient],
                             limit: int) -> HandshakeRefused:
    """Opens connections of ``who`` into ``held`` until one is refused (at most ``limit``)."""
    for _ in range(limit):
        try:
            held.append(await WsClient.connect(app.ws_url, app.token(who)))
        except HandshakeRefused as err:
            return err
    raise AssertionError(f"{limit} connections of one user admitted")


@pytest.fixture
async def held() -> AsyncIterator[list[WsClient]]:
    clients: list[WsClient] = []
    yield clients
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_the_open_connection_cap_holds_across_gateway_replicas(
        conveyor: App, held: list[WsClient]) -> None:
    alice = user("caps")
    err = await open_until_refused(conveyor, alice, held, REPLICAS * MAX_OPEN)
    assert err.code == 4409 and f"at most {MAX_OPEN} per user" in str(err), err
    assert len(held) == MAX_OPEN
    by_gateway = Counter(c.gateway for c in held)
    print("open connections by gateway replica:", dict(by_gateway))
    # On both replicas, neither at the cap: a cap per replica would have admitted more.
    assert len(by_gateway) == REPLICAS and max(by_gateway.values()) < MAX_OPEN, by_gateway
    for _ in range(4):  # wherever the next attempts land, they are refused
        err = await refused(conveyor, alice)
        assert err.code == 4409, err
    # Someone else is not affected, nor are the connections already open.
    other = await WsClient.connect(conveyor.ws_url, conveyor.token(user("caps")))
    await other.close()
    await asyncio.gather(*(c.ping() for c in held))
    # One closed: room for exactly one again, on either replica.
    await held.pop().close()
    held.append(await connect_when_room(conveyor, alice))
    await held[-1].ping()
    assert (await refused(conveyor, alice)).code == 4409
    # A place freed on one replica is taken on the other (the hub heard of the close).
    # Serve's proxy sends a new socket to the replica with fewer open: connections of
    # someone else fill the freed replica up first, until one of alice's lands elsewhere.
    gone = held.pop(0)
    await gone.close()
    filler = user("caps")
    fillers: list[WsClient] = []
    try:
        for _ in range(MAX_OPEN - 1):
            fillers.append(await WsClient.connect(conveyor.ws_url, conveyor.token(filler)))
            client = await connect_when_room(conveyor, alice)
            if client.gateway != gone.gateway:
                held.append(client)
                break
            await client.close()  # landed where the place was freed: give it back, again
        else:
            pytest.fail(f"every connection landed on {gone.gateway}")
    finally:
        await asyncio.gather(*(c.close() for c in fillers))
    assert len(held) == MAX_OPEN
    assert (await refused(conveyor, alice)).code == 4409


async def test_the_attempt_cap_holds_across_gateway_replicas(conveyor: App) -> None:
    bob = user("caps")
    landed: Counter[str] = Counter()
    refusals: list[HandshakeRefused] = []
    t0 = time.monotonic()

    async def attempts() -> None:
        # One attempt after the other, each closed at once (a handshake takes a while on
        # a small machine: several of these outpace the refill of one every 60/N s).
        while not refusals and time.monotonic() - t0 < ATTEMPTS_WITHIN_S:
            try:
                client = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
            except HandshakeRefused as exc:
                refusals.append(exc)
                return
            landed[client.gateway] += 1
            await client.close()

    await asyncio.gather(*(attempts() for _ in range(ATTEMPTERS)))
    elapsed = time.monotonic() - t0
    assert refusals, (landed, elapsed)
    err = refusals[0]
    retry = re.search(r"retry in (\d+) s", str(err))
    assert err.code == 4429 and retry is not None, err
    # A minute's worth (the burst) plus what came back meanwhile (one every 60/N s), give
    # or take the attempts in flight, spread over both replicas: a bucket per replica
    # would have let each replica alone take the burst.
    admitted = landed.total()
    print(f"attempts admitted by gateway replica in {elapsed:.1f} s:", dict(landed))
    assert len(landed) == REPLICAS and max(landed.values()) < PER_MINUTE, landed
    assert PER_MINUTE <= admitted <= PER_MINUTE + elapsed * PER_MINUTE / 60 + ATTEMPTERS, (
        admitted, elapsed, landed)
    assert admitted < REPLICAS * PER_MINUTE, (admitted, elapsed, landed)
    assert 1 <= int(retry[1]) <= 60 / PER_MINUTE + 1
    other = await WsClient.connect(conveyor.ws_url, conveyor.token(user("caps")))
    await other.close()
    await asyncio.sleep(int(retry[1]) + 0.2)
    client = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    await client.ping()
    await client.close()


@pytest.mark.disruptive
async def test_a_restarted_hub_shard_admits_meanwhile_and_is_rebuilt_from_the_gateways(
        conveyor: App, held: list[WsClient]) -> None:
    carol = user("caps")
    ttl = float(conveyor.settings["gateway_ttl_s"])
    while len({c.gateway for c in held}) < REPLICAS or len(held) < 4:
        held.append(await WsClient.connect(conveyor.ws_url, conveyor.token(carol)))
        assert len(held) < MAX_OPEN
    shard = shard_of(carol, int(conveyor.settings["hub_shards"]))
    kill_state_actor(f"conveyor-hub-{shard}")  # restarted by Ray with empty state
    # Meanwhile the shard is away, then knows nothing: a connection is still admitted.
    held.append(await WsClient.connect(conveyor.ws_url, conveyor.token(carol)))
    await held[-1].ping()
    # Once the gateways attached their sockets again (and the shard is certain again),
    # the cap counts every connection carol kept on both replicas.
    hub = ray.get_actor(f"conveyor-hub-{shard}", namespace="conveyor")
    deadline = time.monotonic() + ttl + 30
    while True:
        stats = await hub.stats.remote()
        (online,) = await hub.presence.remote([carol])
        if online[1] and stats["connections"] >= len(held):
            break
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.5)
    await asyncio.sleep(ttl + 0.5)
    await asyncio.gather(*(c.ping() for c in held))  # none was closed for the restart
    err = await open_until_refused(conveyor, carol, held, REPLICAS * MAX_OPEN)
    assert err.code == 4409 and len(held) == MAX_OPEN, (err, len(held))
    assert len({c.gateway for c in held}) == REPLICAS
