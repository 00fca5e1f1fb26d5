"""The soak's judgments (bench/soak.py) on made-up samples: steady memory and latency
pass, a leak and a climbing p99 fail."""

from __future__ import annotations

from bench.soak import Judge, Sample, growth_mb, judge, judge_memory, judge_p99


def samples(rss: list[dict[str, float]], latency_s: list[float]) -> list[Sample]:
    return [Sample(t=5.0 * i, rss_mb=r, delivered=100, delivery_ms={}, ack_ms={},
                   latencies=[lat] * 100) for i, (r, lat) in enumerate(zip(rss, latency_s, strict=True))]


def test_growth_is_the_fitted_line_over_the_span() -> None:
    assert growth_mb([(0, 100), (10, 110), (20, 120)]) == 20.0
    # Noise around a flat line predicts (almost) no growth.
    assert abs(growth_mb([(0, 100), (10, 130), (20, 100), (30, 130), (40, 100)])) < 15


def test_steady_memory_and_latency_pass() -> None:
    rss = [{"Gateway:1": 200 + (i % 3), "stages:2": 150 - (i % 2)} for i in range(20)]
    report = judge({"lost": 0, "accepted": 2000, "samples": samples(rss, [0.02] * 20)}, Judge())
    assert report["ok"], report["verdicts"]
    assert report["verdicts"]["memory"]["judged"] == 2


def test_a_leaking_process_fails_the_memory_judgment() -> None:
    rss = [{"Gateway:1": 200 + 3 * i, "stages:2": 150} for i in range(20)]  # ~3 MiB per sample
    verdict = judge_memory(samples(rss, [0.02] * 20), Judge())
    assert not verdict["ok"]
    assert not verdict["processes"]["Gateway:1"]["ok"]
    assert verdict["processes"]["stages:2"]["ok"]


def test_the_warmup_is_not_judged() -> None:
    rss = [{"Gateway:1": 100 + 40 * min(i, 3)} for i in range(20)]  # grows, then flat
    assert judge_memory(samples(rss, [0.02] * 20), Judge(warmup_fraction=0.2))["ok"]
    assert not judge_memory(samples(rss, [0.02] * 20), Judge(warmup_fraction=0.0))["ok"]


def test_a_climbing_p99_fails_and_a_small_wobble_passes() -> None:
    flat = [{"Gateway:1": 100.0}] * 9
    assert not judge_p99(samples(flat, [0.05] * 3 + [0.1] * 3 + [0.4] * 3), Judge())["ok"]
    assert judge_p99(samples(flat, [0.01] * 3 + [0.02] * 3 + [0.04] * 3), Judge())["ok"]


def test_lost_messages_or_no_memory_series_fail() -> None:
    rss = [{"Gateway:1": 100.0}] * 9
    assert not judge({"lost": 1, "accepted": 10, "samples": samples(rss, [0.02] * 9)}, Judge())["ok"]
    assert not judge({"lost": 0, "accepted": 10, "samples": samples([{}] * 9, [0.02] * 9)},
                     Judge())["ok"]
