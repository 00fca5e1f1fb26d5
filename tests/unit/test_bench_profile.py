"""The benchmark's reading of py-spy's collapsed stacks."""

from __future__ import annotations

from pathlib import Path

from bench.profile import top_frames


def test_top_frames_count_own_and_total_samples(tmp_path: Path) -> None:
    raw = tmp_path / "Gateway-1.txt"
    raw.write_text(
        "run (loop.py:1);handle (gw.py:10);encode (json.py:5) 6\n"
        "run (loop.py:1);handle (gw.py:10) 2\n"
        "run (loop.py:1);poll (hub.py:3);encode (json.py:5) 2\n"
        "garbage line without a count\n")
    top = top_frames(raw, top=3)
    assert top["samples"] == 10
    assert top["ownPct"] == [["encode (json.py:5)", 80.0], ["handle (gw.py:10)", 20.0]]
    # A frame counts once per stack for "total", even if it recurs in that stack.
    assert top["totalPct"][0] == ["run (loop.py:1)", 100.0]
    assert ["handle (gw.py:10)", 80.0] in top["totalPct"]


def test_an_empty_recording_has_no_frames(tmp_path: Path) -> None:
    raw = tmp_path / "stages-2.txt"
    raw.write_text("")
    assert top_frames(raw) == {"samples": 0, "ownPct": [], "totalPct": []}
