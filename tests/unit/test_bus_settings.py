"""Kafka and Redis settings: read like DATABASE_URL (with or without the prefix), topic
defaults as in PROTOCOL.md, and unset by default (the embedded defaults need neither)."""

from __future__ import annotations

import pytest

from settings import Settings


def test_kafka_and_redis_are_off_by_default_with_protocol_topic_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP", "CONVEYOR_KAFKA_BOOTSTRAP", "REDIS_URL", "CONVEYOR_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.kafka_bootstrap is None and s.redis_url is None
    assert (s.kafka_events_topic, s.kafka_ingress_topic, s.kafka_ingress_dlq_topic) == (
        "conveyor.events", "conveyor.ingress", "conveyor.ingress.dlq")


@pytest.mark.parametrize("prefix", ["", "CONVEYOR_"])
def test_kafka_bootstrap_and_redis_url_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.setenv(f"{prefix}KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    monkeypatch.setenv(f"{prefix}REDIS_URL", "redis://127.0.0.1:6379/0")
    s = Settings()
    assert (s.kafka_bootstrap, s.redis_url) == ("127.0.0.1:9092", "redis://127.0.0.1:6379/0")
    again = Settings(**s.to_args())  # how settings travel to replicas
    assert (again.kafka_bootstrap, again.redis_url) == (s.kafka_bootstrap, s.redis_url)
