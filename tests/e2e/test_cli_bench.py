"""``conveyor bench`` at a tiny size: one JSON object on stdout with the chat figures, the
same-run echo ceiling and their ratio, latency percentiles and notifications accepted/s;
nothing lost, duplicated or out of order. No timing is asserted. It starts its own local
Ray clusters in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_bench_prints_one_json_object_and_loses_nothing() -> None:
    exe = shutil.which("conveyor") or str(Path(sys.executable).with_name("conveyor"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    out = subprocess.run([exe, "bench", "--pairs", "2", "--messages", "10", "--inflight", "5",
                          "--notify-requests", "3", "--timeout", "120"],
                         capture_output=True, text=True, env=env, timeout=840)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    chat, echo = report["chat"], report["echo"]
    n = 2 * 10
    assert (chat["sent"], chat["acked"], chat["delivered"], chat["receipted"], chat["stored"]) == (n,) * 5
    assert chat["lost"] == chat["lostStored"] == chat["storedDuplicates"] == 0
    assert chat["outOfOrder"] == chat["storedSeqGaps"] == 0 and chat["timedOut"] is False
    assert echo["delivered"] == n and echo["lost"] == 0
    for run in (chat, echo):
        assert run["msgsPerS"] > 0
        assert set(run["deliveryLatencyMs"]) == {"p50", "p95", "p99", "max"}
    assert set(chat["ackLatencyMs"]) == {"p50", "p95", "p99", "max"}
    assert report["ratio"] == pytest.approx(chat["msgsPerS"] / echo["msgsPerS"], abs=0.001)
    notify = report["notifications"]
    assert notify["acceptedPerS"] > 0 and notify["requests"] == 3 and notify["batchSize"] == 100
    assert report["config"]["pairs"] == 2 and report["elapsedS"] > 0
