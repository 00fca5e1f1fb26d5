"""The soak's short version on the session's application: 60 s of steady open-loop load
(after 10 s of the same load not sampled), memory and latency sampled every 3 s, judged as
``python -m bench.soak`` judges its 10-minute run (README, "Soak"). Report:
``test-artifacts/chaos/soak-short.json``."""

from __future__ import annotations

import orjson
import pytest

from bench.chat import Target
from bench.soak import Judge, conveyor_processes, judge, local_raylet_pid, soak
from tests.chaos.scenario import ARTIFACTS
from tests.conftest import App

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

# Below the session app's per-user credits (100 per 10 s): 8 senders × 5 messages/s.
RATE, PAIRS, DURATION_S, SAMPLE_S, WARMUP_S = 40.0, 8, 60.0, 3.0, 10.0


async def test_short_soak_holds_memory_and_p99_steady(conveyor: App) -> None:
    raylet = local_raylet_pid()
    assert raylet is not None, "the session's Ray runs in this process"
    assert conveyor_processes(raylet, "conveyor"), "no Conveyor process found under the raylet"
    target = Target("session", conveyor.base_url, conveyor.ws_url, conveyor.token)
    run = await soak(target, RATE, DURATION_S, pairs=PAIRS, sample_s=SAMPLE_S, warmup_s=WARMUP_S,
                     processes=lambda: conveyor_processes(raylet, "conveyor"))
    report = judge(run, Judge())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "soak-short.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    v = report["verdicts"]
    print(f"\nsoak: {report['deliveredPerS']} msg/s delivered, p99 first/last third "
          f"{v['p99']['firstThirdMs']}/{v['p99']['lastThirdMs']} ms, total RSS growth "
          f"{v['memory']['totalGrowthMb']} MiB over {v['memory']['judged']} processes")
    assert report["sent"] == report["accepted"] > 0.9 * RATE * (WARMUP_S + DURATION_S), report["verdicts"]
    assert v["memory"]["judged"] >= 4, v["memory"]  # gateways, stage host, proxy, actors
    assert report["ok"], orjson.dumps(v, option=orjson.OPT_INDENT_2).decode()
