"""Per-user connection caps held cluster-wide by the hub shard that owns the user
(``cluster/hub.py``: ``Admissions`` and ``ConnectionHub.admit``), and the gateway's side of
it (``deployments/gateway/hub_link.py``: ``HubLink.admit``, falling back to the replica's
own ``ConnectionLimits``), on plain objects and a stepped clock: no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from cluster.hub import Admissions, ConnectionHub
from deployments.gateway.close_codes import TOO_MANY_ATTEMPTS, TOO_MANY_CONNECTIONS
from deployments.gateway.hub_link import HubLink
from deployments.gateway.limits import ConnectionLimits
from deployments.gateway.sessions import Sessions
from stages.ports.delivery import Admission
from tests.fakes import FakeOutages

CONNECTIONS = Admission("connections")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hub(gateway_ttl_s: float = 15.0) -> Any:
    """The hub actor's class itself, as a plain object."""
    return ConnectionHub.__ray_metadata__.modified_class(0, gateway_ttl_s=gateway_ttl_s)


# --- Admissions: the shard's bookkeeping ------------------------------------------------

def test_the_open_cap_counts_every_gateways_connections_and_reservations() -> None:
    adm = Admissions(15.0, Clock())
    held = {"gw-a": 1, "gw-b": 1}  # attached on two replicas
    assert adm.admit("alice", "c3", "gw-a", held, 1, 4, 100) == Admission()
    # gw-b: its own 1 (open_here) + gw-a's attached 1 + gw-a's reservation c3 = 3
    assert adm.admit("alice", "c4", "gw-b", held, 1, 4, 100) == Admission()
    assert adm.admit("alice", "c5", "gw-a", held, 2, 4, 100) == CONNECTIONS
    assert adm.admit("alice", "c5", "gw-c", held, 0, 4, 100) == CONNECTIONS
    assert adm.admit("bob", "c6", "gw-a", {}, 0, 4, 100) == Admission()  # per user
    assert len(adm) == 3


def test_the_callers_own_count_replaces_what_the_shard_holds_for_it() -> None:
    adm = Admissions(15.0, Clock())
    # The shard still lists 3 on gw-a (a detach on its way); gw-a says 1 is open.
    assert adm.admit("alice", "c1", "gw-a", {"gw-a": 3}, 1, 3, 100) == Admission()
    # gw-b gets no such benefit: gw-a's 3 count for it.
    assert adm.admit("alice", "c2", "gw-b", {"gw-a": 3}, 0, 3, 100) == CONNECTIONS


def test_attempts_are_counted_per_user_across_gateways_refused_ones_included() -> None:
    clock = Clock()
    adm = Admissions(15.0, clock)
    assert adm.admit("alice", "c0", "gw-0", {}, 0, 99, 6) == Admission()
    assert adm.admit("alice", "c1", "gw-1", {}, 0, 99, 6) == Admission()
    for i in range(2, 6):  # refused by the open cap: counted all the same
        assert adm.admit("alice", f"c{i}", "gw-1", {}, 99, 99, 6) == CONNECTIONS
    got = adm.admit("alice", "c9", "gw-0", {}, 0, 99, 6)
    assert got.refused == "attempts" and got.retry_after == pytest.approx(10.0)
    assert adm.admit("bob", "b1", "gw-0", {}, 0, 99, 6) == Admission()
    clock.now += 10  # one attempt back every 60 / 6 s
    assert adm.admit("alice", "c10", "gw-1", {}, 0, 99, 6) == Admission()
    assert adm.admit("alice", "c11", "gw-1", {}, 0, 99, 6).refused == "attempts"


def test_a_repeat_of_an_admission_counts_nothing_again() -> None:
    adm = Admissions(15.0, Clock())
    assert adm.admit("alice", "c1", "gw-a", {}, 0, 1, 2) == Admission()
    assert adm.admit("alice", "c1", "gw-a", {}, 0, 1, 2) == Admission()
    assert adm.admit("alice", "c1", "gw-a", {}, 0, 1, 2) == Admission()
    assert len(adm) == 1
    assert adm.admit("alice", "c2", "gw-b", {}, 0, 5, 2) == Admission()  # 2nd attempt only


def test_a_reservation_is_released_given_back_expired_or_with_its_gateway() -> None:
    clock = Clock()
    adm = Admissions(5.0, clock)
    assert adm.admit("alice", "c1", "gw-a", {}, 0, 1, 100) == Admission()
    assert adm.admit("alice", "c2", "gw-b", {}, 0, 1, 100) == CONNECTIONS
    assert adm.release("c1") and not adm.release("c1")
    assert adm.admit("alice", "c2", "gw-b", {}, 0, 1, 100) == Admission()
    # A socket that never completed: its slot comes back after the TTL.
    clock.now += 4.9
    assert adm.admit("alice", "c3", "gw-a", {}, 0, 1, 100) == CONNECTIONS
    clock.now += 0.2
    assert adm.admit("alice", "c3", "gw-a", {}, 0, 1, 100) == Admission()
    adm.drop_gateway("gw-a")  # presumed dead
    assert len(adm) == 0
    assert adm.admit("alice", "c4", "gw-b", {}, 0, 1, 100) == Admission()
    clock.now += 6
    adm.sweep()
    assert len(adm) == 0 and not adm.reserved and not adm.owner


# --- ConnectionHub: reservations, attach, detach, reaping, restart ----------------------

async def test_the_hub_holds_the_cap_across_gateways_until_connections_close() -> None:
    h = hub()
    h.started -= 60  # long past a restart
    for gw in ("gw-a", "gw-b"):
        assert await h.pull(gw, 0.0) is None
    assert await h.admit("gw-a", "c1", "alice", 0, 3, 100) == Admission()
    assert await h.admit("gw-b", "c2", "alice", 0, 3, 100) == Admission()
    assert (await h.stats())["reserved"] == 2
    assert await h.attach("gw-a", [("c1", "alice")]) == ["alice"]
    await h.attach("gw-b", [("c2", "alice")])
    stats = await h.stats()
    assert stats["reserved"] == 0 and stats["connections"] == 2
    assert await h.admit("gw-a", "c1", "alice", 1, 3, 100) == Admission()  # a repeat
    assert await h.admit("gw-b", "c3", "alice", 1, 3, 100) == Admission()
    assert await h.admit("gw-a", "c4", "alice", 1, 3, 100) == CONNECTIONS
    # The socket of c3 never completed: given back, room for one again.
    assert await h.detach("gw-b", ["c3"]) == []
    assert await h.admit("gw-a", "c4", "alice", 1, 3, 100) == Admission()
    await h.attach("gw-a", [("c4", "alice")])
    assert await h.admit("gw-b", "c5", "alice", 1, 3, 100) == CONNECTIONS
    await h.detach("gw-a", ["c1"])
    assert await h.admit("gw-b", "c5", "alice", 1, 3, 100) == Admission()


async def test_a_dead_gateways_connections_and_reservations_are_released_when_reaped() -> None:
    h = hub(gateway_ttl_s=0.2)
    h.started -= 60
    assert await h.pull("ghost", 0.0) is None
    await h.attach("ghost", [("c1", "alice"), ("c2", "alice")])
    assert await h.admit("ghost", "c3", "alice", 2, 3, 100) == Admission()
    assert await h.admit("live", "c4", "alice", 0, 3, 100) == CONNECTIONS
    await asyncio.sleep(0.3)
    h._reaped_at = 0.0  # reaping is rate-limited to once a second
    assert await h.admit("live", "c4", "alice", 0, 3, 100) == Admission()
    assert (await h.stats())["reserved"] == 1


async def test_a_restarted_shard_is_not_certain_until_gateways_had_time_to_attach_again() -> None:
    h = hub(gateway_ttl_s=0.2)
    got = await h.admit("gw-a", "c1", "alice", 2, 3, 100)
    assert got.refused is None and not got.certain
    # The admission made no gateway entry: the gateway still learns it must re-attach.
    assert await h.pull("gw-a", 0.0) is None
    # What the shard knows is a lower bound: a refusal is certain.
    await h.attach("gw-b", [("c2", "alice"), ("c3", "alice")])
    assert await h.admit("gw-a", "c4", "alice", 1, 3, 100) == CONNECTIONS
    await asyncio.sleep(0.25)
    assert (await h.admit("gw-c", "c5", "bob", 0, 3, 100)).certain


async def test_a_fresh_connections_attach_does_not_hide_the_others_after_a_restart() -> None:
    h = hub()  # restarted: empty
    await h.attach("gw-a", [("c9", "carol")])  # a new socket attached before the pull
    assert await h.pull("gw-a", 0.0) is None   # so the gateway attaches all of them again
    await h.attach("gw-a", [("c1", "alice"), ("c9", "carol")])
    assert await h.pull("gw-a", 0.0) == []
    assert (await h.stats())["connections"] == 2


# --- HubLink.admit: the gateway's side ---------------------------------------------------

@dataclass(eq=False)
class Conn:
    user_id: str
    id: str


class Registry:
    """``ConnectionRegistry.admit`` answering from a script, failing or stalling."""

    def __init__(self, answer: Admission | None = None, fail: bool = False,
                 stall: bool = False) -> None:
        self.answer = answer or Admission()
        self.fail = fail
        self.stall = stall
        self.admits: list[tuple[str, str, str, int, int, int]] = []
        self.detached: list[tuple[str, list[tuple[str, str]]]] = []

    def shard(self, user: str) -> int:
        return 0

    async def admit(self, gateway: str, conn: str, user: str, open_here: int, max_open: int,
                    per_minute: int) -> Admission:
        self.admits.append((gateway, conn, user, open_here, max_open, per_minute))
        if self.stall:
            await asyncio.sleep(3600)
        if self.fail:
            raise ConnectionError("hub shard is gone")
        return self.answer

    async def detach(self, gateway: str, conns: Sequence[tuple[str, str]]) -> list[str]:
        self.detached.append((gateway, list(conns)))
        return []


def link(registry: Registry) -> tuple[HubLink, Sessions, FakeOutages]:
    sessions, outages = Sessions(), FakeOutages()
    return HubLink(None, registry, None, sessions, None, None, outages,  # type: ignore[arg-type]
                   "gw-a"), sessions, outages


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_hubs_refusals_keep_their_close_codes_and_reasons() -> None:
    limits = ConnectionLimits(max_open=32, attempts_per_minute=120)
    hl, sessions, _ = link(Registry(CONNECTIONS))
    refusal = await hl.admit(Conn("alice", "c1"), limits)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == TOO_MANY_CONNECTIONS
    assert refusal.reason == "too many open connections (at most 32 per user)"
    assert refusal.retry_after is None and sessions.count("alice") == 0
    hl, _, _ = link(Registry(Admission("attempts", 9.2)))
    refusal = await hl.admit(Conn("alice", "c1"), limits)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == TOO_MANY_ATTEMPTS
    assert refusal.reason == "too many connection attempts: retry in 10 s"
    assert refusal.retry_after == 10


async def test_an_admitted_connection_counts_here_until_added_then_removed() -> None:
    registry = Registry()
    hl, sessions, _ = link(registry)
    limits = ConnectionLimits(max_open=4, attempts_per_minute=120)
    first = Conn("alice", "c1")
    assert await hl.admit(first, limits) is None  # type: ignore[arg-type]
    assert sessions.count("alice") == 1  # being opened
    assert await hl.admit(Conn("alice", "c2"), limits) is None  # type: ignore[arg-type]
    assert [a[3] for a in registry.admits] == [0, 1]  # open_here: the other one in flight
    assert registry.admits[0][:3] == ("gw-a", "c1", "alice") and registry.admits[0][4:] == (4, 120)
    sessions.remove(first)  # type: ignore[arg-type]
    assert sessions.count("alice") == 1
    await settle()
    assert registry.detached == []  # nothing to give back on the happy path


async def test_an_unreachable_hub_falls_back_to_the_replicas_own_caps() -> None:
    hl, sessions, outages = link(Registry(fail=True))
    limits = ConnectionLimits(max_open=2, attempts_per_minute=120)
    assert await hl.admit(Conn("alice", "c1"), limits) is None  # type: ignore[arg-type]
    assert await hl.admit(Conn("alice", "c2"), limits) is None  # type: ignore[arg-type]
    refusal = await hl.admit(Conn("alice", "c3"), limits)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == TOO_MANY_CONNECTIONS
    assert await hl.admit(Conn("bob", "c4"), limits) is None  # type: ignore[arg-type]
    assert outages.reports == [("hub", "admit", 1)] * 4
    await settle()
    # The refused one's call may still reach the shard: its slot is given back.
    assert [c for _, cs in hl.hub.detached for c, _ in cs] == ["c3"]  # type: ignore[attr-defined]
    assert sessions.count("alice") == 2


async def test_a_stalled_hub_does_not_hold_the_handshake_for_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import deployments.gateway.hub_link as hub_link

    monkeypatch.setattr(hub_link, "ADMIT_TIMEOUT_S", 0.05)
    hl, _, outages = link(Registry(stall=True))
    limits = ConnectionLimits(max_open=2, attempts_per_minute=120)
    async with asyncio.timeout(1):
        assert await hl.admit(Conn("alice", "c1"), limits) is None  # type: ignore[arg-type]
    assert outages.reports == [("hub", "admit", 1)]


async def test_an_uncertain_admission_also_passes_the_replicas_own_caps() -> None:
    registry = Registry(Admission(certain=False))
    hl, sessions, _ = link(registry)
    limits = ConnectionLimits(max_open=1, attempts_per_minute=120)
    assert await hl.admit(Conn("alice", "c1"), limits) is None  # type: ignore[arg-type]
    refusal = await hl.admit(Conn("alice", "c2"), limits)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == TOO_MANY_CONNECTIONS
    await settle()
    assert registry.detached == [("gw-a", [("c2", "alice")])]  # its reservation released
    assert sessions.count("alice") == 1


async def test_a_handshake_cancelled_during_admission_gives_its_slot_back() -> None:
    registry = Registry(stall=True)
    hl, sessions, _ = link(registry)
    limits = ConnectionLimits(max_open=2, attempts_per_minute=120)
    task = asyncio.create_task(hl.admit(Conn("alice", "c1"), limits))  # type: ignore[arg-type]
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert registry.detached == [("gw-a", [("c1", "alice")])]
    assert sessions.count("alice") == 0
