"""The ``/metrics`` exposition: what the recorder holds comes out as Prometheus text that
the reference parser reads back exactly (names, types, values, buckets, escaped labels)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.telemetry import BUCKETS, METRICS, Recorder, Telemetry, render

AWKWARD = 'say "hi"\\back\nslash'  # a quote, a backslash and a newline


def parsed(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def scrape(recorder: Recorder) -> str:
    counters, hist, gauges = recorder.drain()
    return render(counters, hist, gauges)


def test_counters_keep_their_documented_total_names_and_escape_label_values() -> None:
    r = Recorder()
    r.inc("conveyor_messages_in_total", type="chat")
    r.inc("conveyor_messages_in_total", 2, type="chat")
    r.inc("conveyor_messages_in_total", type=AWKWARD)
    r.inc("conveyor_dropped_total", 4, type="signal", stage="dedup", reason="duplicate")
    text = scrape(r)
    assert "# TYPE conveyor_messages_in_total counter" in text
    assert "conveyor_messages_in_total_total" not in text and "_created" not in text
    families = parsed(text)
    messages = families["conveyor_messages_in"]  # the parser names a counter without _total
    assert messages.type == "counter"
    assert messages.documentation == METRICS["conveyor_messages_in_total"][1]
    assert samples(messages) == {
        ("conveyor_messages_in_total", (("type", "chat"),)): 3.0,
        ("conveyor_messages_in_total", (("type", AWKWARD),)): 1.0,  # round-trips exactly
    }
    assert samples(families["conveyor_dropped"]) == {
        ("conveyor_dropped_total", (("reason", "duplicate"), ("stage", "dedup"),
                                    ("type", "signal"))): 4.0}


def test_gauges_and_undeclared_series_are_exported() -> None:
    r = Recorder()
    r.set("conveyor_connections", 7, replica=AWKWARD)
    r.set("conveyor_users_online", 3)
    r.set("conveyor_not_declared", 1.5, shard="0")
    r.inc("conveyor_not_declared_either_total")
    families = parsed(scrape(r))
    assert families["conveyor_connections"].type == "gauge"
    assert samples(families["conveyor_connections"]) == {
        ("conveyor_connections", (("replica", AWKWARD),)): 7.0}
    assert samples(families["conveyor_users_online"]) == {("conveyor_users_online", ()): 3.0}
    assert families["conveyor_not_declared"].type == "unknown"  # exported untyped
    assert samples(families["conveyor_not_declared"]) == {
        ("conveyor_not_declared", (("shard", "0"),)): 1.5}
    assert samples(families["conveyor_not_declared_either_total"]) == {
        ("conveyor_not_declared_either_total", ()): 1.0}


def test_histograms_have_cumulative_buckets_sum_and_count() -> None:
    r = Recorder()
    for v in (0.0005, 0.003, 0.003, 0.2, 7.0, 60.0):
        r.observe("conveyor_stage_seconds", v, stage=AWKWARD)
    families = parsed(scrape(r))
    stage = families["conveyor_stage_seconds"]
    assert stage.type == "histogram"
    got = samples(stage)
    lb = (("stage", AWKWARD),)
    buckets = {float(dict(k[1])["le"]): v for k, v in got.items()
               if k[0] == "conveyor_stage_seconds_bucket"}
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    expected = {0.001: 1, 0.0025: 1, 0.005: 3, 0.01: 3, 0.025: 3, 0.05: 3, 0.1: 3, 0.25: 4,
                0.5: 4, 1.0: 4, 2.5: 4, 5.0: 4, 10.0: 5, float("inf"): 6}
    assert buckets == expected
    assert got[("conveyor_stage_seconds_count", lb)] == 6.0
    assert got[("conveyor_stage_seconds_sum", lb)] == pytest.approx(67.2065)
    assert all(dict(k[1])["stage"] == AWKWARD for k in got)


def test_every_declared_metric_is_exported_with_its_type_even_before_it_moves() -> None:
    families = parsed(render({}, {}, {}))
    for name, (kind, help_text) in METRICS.items():
        if kind == "counter":
            assert name.endswith("_total"), name  # the library adds _total to counters
            name = name.removesuffix("_total")
        assert families[name].type == kind, name
        assert families[name].documentation == help_text
    assert all(not f.samples for f in families.values())


async def test_the_merged_snapshot_renders_sums_across_processes() -> None:
    """What the Telemetry actor merges (counters and histograms summed, gauges per
    process) renders as one set of families."""
    actor = Telemetry.__ray_metadata__.modified_class(gauge_ttl_s=30.0)  # no Ray needed
    for source in ("gateway-1", "gateway-2"):
        r = Recorder()
        r.inc("conveyor_acks_total", type="chat", status="accepted")
        r.observe("conveyor_batch_size", 8.0, type="chat")
        r.set("conveyor_connections", 2, replica=source)
        await actor.push(source, *r.drain())
    families = parsed(render(*await actor.snapshot()))
    assert samples(families["conveyor_acks"]) == {
        ("conveyor_acks_total", (("status", "accepted"), ("type", "chat"))): 2.0}
    assert samples(families["conveyor_batch_size"])[
        ("conveyor_batch_size_count", (("type", "chat"),))] == 2.0
    assert sum(samples(families["conveyor_connections"]).values()) == 4.0
