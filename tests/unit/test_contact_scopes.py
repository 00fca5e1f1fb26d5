"""Who may signal whom and whose presence one may ask: contacts (users sharing a chat) by
default, anyone with the scope settings; the stage, the cached contacts and the presence
endpoint with fakes, no Ray, no database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

from adapters.auth import Principal
from adapters.cached_directory import CachedContacts
from deployments.gateway.chats_api import ChatsApi
from serve_app.bootstrap import stage_defaults
from settings import Settings
from stages.builtin import default_registry
from stages.model import Envelope, Verdict
from stages.pipeline import Pipeline
from stages.ports import Delivery, Ports
from stages.presence import FanoutPresence
from stages.resolver import ConfigError, StageSpec
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal
from tests.fakes import FakeContacts, FakeDedup, FakeHub

CHATS = {"c1": {"alice", "bob"}, "c2": {"alice", "carol", "dave"}, "c3": {"erin", "frank"}}


def signal(i: str, to: Any, sender: str = "alice") -> Envelope:
    return Envelope(type="signal", id=i, sender=sender, fields={"to": to, "payload": {"n": i}})


async def test_a_signal_goes_to_contacts_and_the_sender_only() -> None:
    contacts = FakeContacts(CHATS)
    out = await ValidateSignal(contacts=contacts).process([
        signal("1", "bob"), signal("2", "dave"), signal("3", "erin"), signal("4", "alice"),
        signal("5", "zoe"), signal("6", ""), signal("7", "erin", sender="frank")])
    assert [(o.verdict, o.code) for o in out] == [
        (Verdict.CONTINUE, None), (Verdict.CONTINUE, None), (Verdict.REJECT, "forbidden"),
        (Verdict.CONTINUE, None), (Verdict.REJECT, "forbidden"), (Verdict.REJECT, "invalid"),
        (Verdict.CONTINUE, None)]
    assert out[2].message == "the recipient shares no chat with the sender"
    # One query for the batch: each distinct (sender, recipient) once; neither the sender
    # to itself nor a malformed frame is asked about.
    assert contacts.share_calls == [[("alice", "bob"), ("alice", "dave"), ("alice", "erin"),
                                     ("alice", "zoe"), ("frank", "erin")]]


async def test_a_batch_of_signals_to_oneself_or_malformed_asks_nothing() -> None:
    contacts = FakeContacts(CHATS)
    out = await ValidateSignal(contacts=contacts).process(
        [signal("1", "alice"), signal("2", 42), signal("3", "zoe", sender="zoe")])
    assert [o.code for o in out] == [None, "invalid", None]
    assert contacts.share_calls == []


async def test_without_contacts_a_signal_may_go_to_anyone() -> None:
    out = await ValidateSignal().process([signal("1", "erin"), signal("2", "zoe")])
    assert [o.verdict for o in out] == [Verdict.CONTINUE, Verdict.CONTINUE]


async def test_a_refused_signal_is_neither_deduped_nor_forwarded() -> None:
    contacts, dedup, hub = FakeContacts(CHATS), FakeDedup(), FakeHub()
    route = Pipeline([ValidateSignal(contacts=contacts), DedupSignal(dedup), ForwardSignal(hub)])
    out = await route.run([signal("1", "erin"), signal("2", "bob")])
    assert [(o.verdict, o.code) for o in out] == [(Verdict.REJECT, "forbidden"),
                                                 (Verdict.DONE, None)]
    assert hub.published == [Delivery(["bob"], {"type": "signal", "id": "2", "from": "alice",
                                                "payload": {"n": "2"}})]
    assert dedup.seen == {"alice\x1f2"}  # the refused id stays free for a retry


def test_the_scope_comes_from_the_settings_and_a_stage_option_wins() -> None:
    reg, contacts = default_registry(), FakeContacts(CHATS)

    def built(options: dict[str, Any], **settings: Any) -> Any:
        ports = Ports(contacts=contacts, defaults=stage_defaults(Settings(**settings)))
        return reg.build(StageSpec("validate_signal", options), ports).contacts

    assert Settings().signal_scope == "contacts" and Settings().presence_scope == "contacts"
    assert built({}) is contacts
    assert built({}, signal_scope="anyone") is None
    assert built({"scope": "contacts"}, signal_scope="anyone") is contacts
    assert built({"scope": "anyone"}) is None
    with pytest.raises(ConfigError, match="scope"):
        built({"scope": "friends"})
    with pytest.raises(ValueError):
        Settings(presence_scope="everyone")  # type: ignore[arg-type]


async def test_presence_frames_go_to_the_same_contacts() -> None:
    hub = FakeHub()
    env = Envelope(type="presence", id="p", sender="alice", fields={"online": True})
    await FanoutPresence(FakeContacts(CHATS), hub).process([env])
    assert hub.published == [Delivery(["bob", "carol", "dave"], {
        "type": "system", "event": "presence",
        "data": {"userId": "alice", "online": True, "lastSeen": None}})]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_cached_contacts_keep_pairs_found_and_ask_again_for_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("adapters.cached_directory.time.monotonic", clock)
    chats = {k: set(v) for k, v in CHATS.items()}
    store = FakeContacts(chats)
    cached = CachedContacts(store, ttl_s=5.0)
    assert await cached.share_chat([("alice", "bob"), ("alice", "erin")]) == {("alice", "bob")}
    # Found pairs are kept, either way round; a pair not found is asked again, so a chat
    # created a moment ago counts at once.
    chats["c4"] = {"alice", "erin"}
    assert await cached.share_chat([("bob", "alice"), ("alice", "erin")]) == {
        ("bob", "alice"), ("alice", "erin")}
    assert store.share_calls == [[("alice", "bob"), ("alice", "erin")], [("alice", "erin")]]
    assert await cached.share_chat([("erin", "alice")]) == {("erin", "alice")}
    assert len(store.share_calls) == 2
    # After ttl_s a pair is read again: a membership change is seen within it.
    del chats["c1"]
    clock.now += 5.0
    assert await cached.share_chat([("alice", "bob")]) == set()
    assert await cached.share_chat([]) == set()
    assert store.share_calls[-1] == [("alice", "bob")] and len(store.share_calls) == 3
    # Everyone-sharing-a-chat (presence frames) is read from the store each time.
    assert await cached.contacts(["erin"]) == {"erin": frozenset({"alice", "erin", "frank"})}


async def test_cached_contacts_stay_bounded() -> None:
    store = FakeContacts({"c": {f"u{i}" for i in range(10)}})
    cached = CachedContacts(store, max_pairs=4)
    await cached.share_chat([("u0", f"u{i}") for i in range(1, 4)])
    await cached.share_chat([("u1", f"u{i}") for i in range(2, 5)])
    assert len(cached._shared) <= 4


class Registry:
    """The hub's presence answer: everyone offline, never seen; records who was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def presence(self, users: Sequence[str]) -> list[tuple[str, bool, float | None]]:
        self.asked.append(list(users))
        return [(u, False, None) for u in users]


def presence_client(contacts: FakeContacts | None) -> tuple[TestClient, Registry]:
    hub = Registry()

    async def guard(request: Request) -> Principal:
        return Principal(request.headers["x-user"], None, frozenset())

    api = ChatsApi(None, None, hub, guard, contacts)  # type: ignore[arg-type]
    return TestClient(Starlette(routes=api.routes())), hub


@pytest.mark.parametrize("asked", ["alice", "bob", "alice,bob,carol", "bob,bob"])
def test_presence_answers_for_the_caller_and_its_contacts(asked: str) -> None:
    client, hub = presence_client(FakeContacts(CHATS))
    r = client.get("/v1/presence", params={"userId": asked}, headers={"x-user": "alice"})
    assert r.status_code == 200, r.text
    assert [u["userId"] for u in r.json()["users"]] == asked.split(",")
    assert hub.asked == [asked.split(",")]


def test_presence_of_a_non_contact_is_refused_naming_them() -> None:
    contacts = FakeContacts(CHATS)
    client, hub = presence_client(contacts)
    r = client.get("/v1/presence", params=[("userId", "erin,bob"), ("userId", "zoe"),
                                           ("userId", "erin")], headers={"x-user": "alice"})
    assert r.status_code == 403
    assert r.json() == {"error": {"code": "forbidden", "message":
                                  "not contacts of the caller (no chat shared): erin, zoe"}}
    assert hub.asked == []  # nothing is answered, for the contacts either
    assert contacts.share_calls == [[("alice", "erin"), ("alice", "bob"), ("alice", "zoe")]]
    # A user in no chat may still ask about itself, and nobody else.
    assert client.get("/v1/presence?userId=zoe", headers={"x-user": "zoe"}).status_code == 200
    assert client.get("/v1/presence?userId=alice", headers={"x-user": "zoe"}).status_code == 403
    # Validation comes first: a bad request is 400 whoever it names.
    assert client.get("/v1/presence?userId=erin,", headers={"x-user": "alice"}).status_code == 400


def test_presence_with_scope_anyone_answers_for_everyone() -> None:
    client, hub = presence_client(None)
    r = client.get("/v1/presence?userId=erin,zoe", headers={"x-user": "alice"})
    assert r.status_code == 200 and hub.asked == [["erin", "zoe"]]
