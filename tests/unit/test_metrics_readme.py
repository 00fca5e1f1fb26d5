"""Every metric the code declares is documented in the README, and nothing more."""

from __future__ import annotations

import re
from pathlib import Path

from cluster.telemetry import METRICS, render

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\|\s*`(conveyor_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|")


def documented() -> dict[str, str]:
    """name -> type, from the table of the README's "Metrics" section."""
    text = README.read_text()
    start = text.index("\n## Metrics\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_metrics_table_lists_exactly_the_declared_metrics_with_their_types() -> None:
    rows = documented()
    assert rows, "no metrics table found in the README's Metrics section"
    assert sorted(set(METRICS) - set(rows)) == [], "declared but not in the README"
    assert sorted(set(rows) - set(METRICS)) == [], "in the README but not declared"
    assert {n: t for n, (t, _) in METRICS.items()} == rows


def test_declared_metrics_export_with_type_and_help() -> None:
    key = ("conveyor_notification_attempts_total", (("channel", "email"), ("status", "sent")))
    text = render({key: 2.0}, {}, {})
    assert "# TYPE conveyor_notification_attempts_total counter" in text
    assert "# HELP conveyor_notification_attempts_total " in text
    assert "untyped" not in text
