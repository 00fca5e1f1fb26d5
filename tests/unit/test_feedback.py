"""The feedback loop's controller."""

from stages.feedback import PaceConfig, Pacer


def test_pressure_halves_the_batch_and_backs_off_then_recovers_by_itself() -> None:
    p = Pacer(PaceConfig(min_interval_s=0.1, max_interval_s=1.6, min_batch=10, max_batch=400,
                         step=100, target_latency_s=0.2, high_backlog=100, saturated_backlog=1000))
    assert (p.batch, p.interval_s, p.state) == (400, 0.1, "normal")
    p.observe(latency_s=0.5, backlog=0)
    assert (p.batch, p.interval_s, p.state) == (200, 0.2, "throttled")
    p.observe(latency_s=0.0, backlog=150)
    p.observe(latency_s=0.0, backlog=0, refused=True)
    assert (p.batch, p.interval_s) == (50, 0.8)
    for _ in range(10):
        p.observe(latency_s=0.0, backlog=5000)
    assert p.paused and p.state == "paused" and p.batch == 10 and p.interval_s == 1.6
    for _ in range(10):
        p.observe(latency_s=0.01, backlog=0)
    assert (p.batch, p.interval_s, p.state, p.paused) == (400, 0.1, "normal", False)
    assert p.pressure_events == 13
