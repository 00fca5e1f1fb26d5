"""Faults of the servers around Conveyor, under load: the Kafka broker and Redis restarted,
the notification dispatcher killed with a batch in flight.

They need an application configured with Kafka, Redis and SMTP, so this module deploys a
second Serve application in the session's Ray (its own database, state actors and topics,
under /chaos), as tests/e2e/test_bus.py does, with the suite's broker and redis-server and
an SMTP sink (aiosmtpd) of its own. Restarting the suite's servers is disruptive: these run
last. Result rows: ``test-artifacts/chaos/<fault>.json``.
"""

from __future__ import annotations

import asyncio
import email
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from settings import Settings
from tests.chaos import faults
from tests.chaos.history import Verdict
from tests.chaos.scenario import assert_clean, run_fault, write_row
from tests.conftest import E2E_SETTINGS, SMALL, App, free_port, side_app
from tests.integration.kafka_helpers import make_topics, read_topic, values

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive, pytest.mark.chaos]

APP_NAME = "chaos"
SMTP_DELAY_S = 0.1  # per e-mail, so a batch of 40 stays in flight for seconds


class SlowSink:
    """aiosmtpd handler keeping every e-mail it accepted, in order, as (X-Notification-Id,
    Message-ID); each takes ``SMTP_DELAY_S``."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(SMTP_DELAY_S)
        msg = email.message_from_bytes(envelope.content)
        self.mails.append((str(msg["X-Notification-Id"]), str(msg["Message-ID"])))
        return "250 Message accepted"


@pytest.fixture(scope="module")
def smtp_sink() -> Iterator[tuple[SlowSink, int]]:
    sink, port = SlowSink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def chaos_app(conveyor: App, new_database: Any, kafka_broker: Any, redis_server: Any,
              smtp_sink: tuple[SlowSink, int], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[App]:
    work = tmp_path_factory.mktemp("chaos")
    tag = uuid.uuid4().hex[:6]
    topics = {"kafka_events_topic": f"chaos.{tag}.events",
              "kafka_ingress_topic": f"chaos.{tag}.ingress",
              "kafka_ingress_dlq_topic": f"chaos.{tag}.dlq"}
    asyncio.run(make_topics(kafka_broker.bootstrap, *topics.values()))
    settings = {**E2E_SETTINGS, "data_dir": str(conveyor.data_dir),
                "database_url": new_database("chaos"), "mail_dir": str(work / "mail"),
                "state_actor_prefix": "chaos",
                "kafka_bootstrap": kafka_broker.bootstrap, **topics,
                "kafka_ingress_group": f"chaos-{tag}", "event_relay_interval_s": 0.1,
                "event_relay_backoff_max_s": 2.0, "event_relay_lease_s": 20.0,
                "redis_url": redis_server.url,
                "smtp_host": "127.0.0.1", "smtp_port": smtp_sink[1],
                "notification_lease_s": 5.0, "notification_flush_interval_s": 0.5}
    options = {name: SMALL for name in ("Gateway", "stages", "OutboxRelay",
                                        "NotificationDispatcher", "EventRelay", "KafkaIngress")}
    # Its state actors (prefix "chaos") are detached: side_app ends them with it.
    with side_app(conveyor, APP_NAME, settings, options=options, ready_timeout_s=90) as app:
        yield app


async def test_kafka_broker_restarted_under_load(chaos_app: App, kafka_broker: Any) -> None:
    async def restart(load: Any) -> dict[str, Any]:
        await asyncio.to_thread(kafka_broker.restart, 3.0)
        return {"downS": 3.0}

    verdict, row, history = await run_fault("kafka-restarted", chaos_app.base_url,
                                            chaos_app.ws_url, chaos_app.token, restart)
    assert_clean(verdict, row)
    # Every stored message is published to the events topic, at least once.
    stored = {str(m["messageId"]) for items in history.stored.values() for m in items
              if m.get("type", "message") == "message"}
    records = await read_topic(kafka_broker.bootstrap, chaos_app.settings["kafka_events_topic"],
                               at_least=len(stored), timeout_s=60)
    published = {v.get("messageId") for v in values(records) if v.get("type") == "message"}
    missing = stored - published
    print(f"events: {len(published)} published, {len(missing)} of {len(stored)} stored missing")
    assert not missing, sorted(missing)[:10]


async def test_redis_restarted_under_load(chaos_app: App, redis_server: Any) -> None:
    async def restart(load: Any) -> dict[str, Any]:
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(redis_server.start)
        return {"downS": 3.0}

    verdict, row, _ = await run_fault("redis-restarted", chaos_app.base_url, chaos_app.ws_url,
                                      chaos_app.token, restart)
    assert_clean(verdict, row)


def repeat_bound(settings: dict[str, Any]) -> int:
    """How many e-mails a killed dispatcher replica may have sent without recording them:
    its SMTP channel's slots (``smtp_pool_size``), each held from a message's transaction
    until its delivery is committed (``record_delivered``)."""
    return int(settings.get("smtp_pool_size", Settings.model_fields["smtp_pool_size"].default))


async def test_dispatcher_killed_with_a_batch_in_flight_sends_each_email_once(
        chaos_app: App, smtp_sink: tuple[SlowSink, int]) -> None:
    """Each delivery is recorded as its send completes, so a dispatcher killed mid-round
    leaves all but its sends in flight recorded: the replica that claims the round after
    the lease repeats at most ``repeat_bound`` e-mails, each with the Message-ID of its
    first copy (a receiver can tell it is the same message); none is lost."""
    sink = smtp_sink[0]
    n = 40
    bound = repeat_bound(chaos_app.settings)
    who = f"svc-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {chaos_app.token(who)}"}
    items = [{"contacts": [{"type": "email", "value": f"n{i}@example.com"}],
              "message": f"chaos {i}", "isImmediate": False,
              "strategy": "send_to_first_available"} for i in range(n)]
    async with httpx.AsyncClient(base_url=chaos_app.base_url, timeout=30) as http:
        r = await http.post("/v1/notifications", headers=headers, json=items)
        assert r.status_code == 202, r.text[:500]  # seed 004: every notification valid
        ids = [d["notification"]["id"] for d in r.json()["details"]]
        assert len(ids) == n
        mine = set(ids)

        def sent() -> dict[str, list[str]]:
            """Message-IDs of each of our notifications' e-mails, in arrival order."""
            copies: dict[str, list[str]] = {}
            for nid, message_id in list(sink.mails):
                if nid in mine:
                    copies.setdefault(nid, []).append(message_id)
            return copies

        def count() -> int:
            return sum(len(c) for c in sent().values())

        # The batch is in flight once the sink has some of it and not all.
        deadline = time.monotonic() + 60
        while count() < 5:
            assert time.monotonic() < deadline, "the batch never started"
            await asyncio.sleep(0.05)
        replicas = await asyncio.to_thread(faults.replica_actors, APP_NAME, "NotificationDispatcher")
        fault_at = time.monotonic()
        await asyncio.to_thread(faults.kill_replica, replicas[0])
        at_kill = count()

        async def state(nid: str) -> str:
            return str((await http.get(f"/v1/notifications/{nid}", headers=headers)).json().get("state"))

        deadline = time.monotonic() + 120
        while True:
            states = Counter(await asyncio.gather(*(state(i) for i in ids)))
            if states["delivered"] == n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        recovery = round(time.monotonic() - fault_at, 2)
        await asyncio.sleep(2.0)  # a late repeat would arrive by now
    copies = sent()
    repeats = sum(len(c) - 1 for c in copies.values())
    # A repeat under another Message-ID would be a duplicate no receiver could detect.
    undetectable = sum(m != c[0] for c in copies.values() for m in c[1:])
    verdict = Verdict(offered=n, accepted=len(ids), delivered=len(copies),
                      lost=n - len(copies), duplicates=undetectable)
    foreign = sorted(nid for nid, c in copies.items() if not c[0].startswith(f"<{nid}.0@"))
    verdict.violations += [f"{nid}: Message-ID {copies[nid][0]} is not the notification's"
                           for nid in foreign]
    row = verdict.row(fault="dispatcher-killed", recoveryS=recovery, sentBeforeKill=at_kill,
                      repeats=repeats, repeatBound=bound, states=dict(states))
    write_row("dispatcher-killed", row, verdict)
    assert at_kill < n, "the whole batch was sent before the kill: nothing was in flight"
    assert states["delivered"] == n, states
    assert row["lost"] == 0, sorted(mine - set(copies))[:10]
    assert verdict.violations == [], verdict.violations[:10]
    assert undetectable == 0, {nid: c for nid, c in copies.items() if len(set(c)) > 1}
    assert repeats <= bound, (f"{repeats} e-mails sent again ({at_kill} had been sent when the "
                              f"dispatcher was killed); at most {bound} can be in flight")
