"""``conveyor status`` against the session app: readiness, Serve's deployments and replicas
(from the Serve controller: the session's Ray has no dashboard), and the buffers, outbox,
delivery-lag and connection figures of ``/metrics``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import WsClient
from tests.client import user
from tests.conftest import App

pytestmark = pytest.mark.e2e


def status(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("conveyor") or str(Path(sys.executable).with_name("conveyor"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return subprocess.run([exe, "status", *args], capture_output=True, text=True, env=env,
                          timeout=120)


async def test_status_reports_deployments_replicas_buffers_outbox_and_lag(conveyor: App) -> None:
    import ray

    gcs = ray.get_runtime_context().gcs_address
    me = user("status")
    async with await WsClient.connect(conveyor.ws_url, conveyor.token(me)):
        out = status("--url", conveyor.base_url, "--dashboard", "", "--ray-address", gcs, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ready"] is True
    assert all(c["status"] == "up" for c in report["health"]["checks"].values())
    deployments = report["serve"]["conveyor"]["deployments"]
    assert {"Gateway", "stages", "OutboxRelay", "NotificationDispatcher"} <= set(deployments)
    assert deployments["Gateway"]["replicas"] == {"RUNNING": 2}
    assert deployments["Gateway"]["targetReplicas"] == 2
    assert all(d["status"] == "HEALTHY" for d in deployments.values())
    m = report["metrics"]
    for key in ("conveyor_outbox_pending", "conveyor_outbox_lag_seconds",
                "conveyor_deliveries_pending", "conveyor_delivery_lag_seconds",
                "conveyor_hub_mailbox_depth", "conveyor_buffer_depth"):
        assert key in m, key
    assert m["conveyor_connections"] >= 1  # this test's own socket, at least

    text = status("--url", conveyor.base_url, "--dashboard", "", "--ray-address", gcs)
    assert text.returncode == 0, text.stderr
    for words in ("ready", "Gateway", "RUNNING", "outbox:", "delivery:", "buffers:"):
        assert words in text.stdout, (words, text.stdout)


def test_status_of_an_unreachable_app_says_so_and_fails() -> None:
    out = status("--url", "http://127.0.0.1:9", "--dashboard", "", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ready"] is False and "error" in report["metrics"] and report["serve"] is None
