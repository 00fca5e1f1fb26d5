"""``conveyor status``: what a running application is doing, in one screen (or JSON).

Three sources, each optional but the first:

- the application itself: ``GET /health/ready`` (per-dependency detail) and ``GET /metrics``
  (buffers, outbox, delivery lag, connections, hub mailboxes), on the Serve proxy's URL;
- Serve's own view of deployments and replicas (state, node), from the Ray dashboard's REST
  API (``GET /api/serve/applications/``, the token of ``ray get-auth-token`` when the
  cluster asks for one), or else from the Serve controller when a Ray address is given
  (``--ray-address``; ``auto`` joins the local cluster as a short-lived driver).

A source that cannot be reached is reported as such; the command still prints the rest.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Gauges summed over their series (per replica / per type): the cluster-wide figure.
SUMMED = ("conveyor_connections", "conveyor_users_online", "conveyor_deliveries_unreceipted",
          "conveyor_hub_mailbox_depth", "conveyor_outbox_pending", "conveyor_deliveries_pending")
# Gauges where the worst series is the figure (ages, in seconds).
WORST = ("conveyor_outbox_lag_seconds", "conveyor_delivery_lag_seconds")
COUNTERS = ("conveyor_messages_in_total", "conveyor_dropped_total", "conveyor_overload_total",
            "conveyor_redeliveries_total", "conveyor_credit_rejections_total")


def metrics_summary(text: str) -> dict[str, Any]:
    """The figures ``status`` shows, from a ``/metrics`` exposition."""
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series[s.name].append((s.labels, s.value))
    out: dict[str, Any] = {}
    for name in SUMMED:
        out[name] = sum(v for _, v in series.get(name, []))
    for name in WORST:
        out[name] = max((v for _, v in series.get(name, [])), default=0.0)
    buffers: dict[str, float] = defaultdict(float)
    for lb, v in series.get("conveyor_buffer_depth", []):
        buffers[lb.get("type", "")] += v
    out["conveyor_buffer_depth"] = dict(sorted(buffers.items()))
    for name in COUNTERS:
        by_type: dict[str, float] = defaultdict(float)
        for lb, v in series.get(name, []):
            by_type[lb.get("type", "")] += v
        out[name] = dict(sorted(by_type.items()))
    return out


def app_status(url: str, timeout: float = 10.0) -> dict[str, Any]:
    out: dict[str, Any] = {"url": url}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as http:
        try:
            r = http.get("/health/ready")
            out["ready"] = r.status_code == 200
            out["health"] = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            out["ready"], out["health"] = False, {"error": repr(exc)}
        try:
            r = http.get("/metrics")
            r.raise_for_status()
            out["metrics"] = metrics_summary(r.text)
        except httpx.HTTPError as exc:
            out["metrics"] = {"error": repr(exc)}
    return out


def _plain(x: Any) -> Any:
    """An enum from the controller (``ReplicaState.RUNNING``) as the REST API spells it."""
    return getattr(x, "value", x)


def summarize_serve(details: dict[str, Any]) -> dict[str, Any]:
    """Serve's instance details (the dashboard's ``/api/serve/applications/`` JSON, the
    controller's ``get_serve_details()``) down to application → deployment → replicas."""
    apps: dict[str, Any] = {}
    for app_name, app in (details.get("applications") or {}).items():
        deps: dict[str, Any] = {}
        for dep_name, dep in (app.get("deployments") or {}).items():
            replicas = dep.get("replicas") or []
            states: dict[str, int] = defaultdict(int)
            for rep in replicas:
                states[str(_plain(rep.get("state")))] += 1
            config = dep.get("deployment_config") or {}
            deps[dep_name] = {
                "status": _plain(dep.get("status")),
                "targetReplicas": dep.get("target_num_replicas"),
                "replicas": dict(states),
                # ip and short node id: nodes of one machine share an ip
                "nodes": sorted({f"{rep.get('node_ip') or '?'} ({str(rep.get('node_id') or '?')[:6]})"
                                 for rep in replicas}),
                "autoscaling": config.get("autoscaling_config") is not None,
            }
        apps[app_name] = {"status": _plain(app.get("status")), "deployments": deps}
    return apps


def dashboard_token() -> str | None:
    """``RAY_AUTH_TOKEN``, or what ``ray get-auth-token`` prints for the local cluster."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([ray_cli if os.path.exists(ray_cli) else "ray", "get-auth-token"],
                             capture_output=True, text=True, timeout=30)
        token = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
        return token or None
    return None


def serve_from_dashboard(dashboard: str, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{dashboard.rstrip('/')}/api/serve/applications/", headers=headers,
                  timeout=timeout)
    if r.status_code in (401, 403) and token is None:
        token = dashboard_token()
        if token:
            return serve_from_dashboard(dashboard, token, timeout)
    r.raise_for_status()
    return summarize_serve(r.json())


def serve_from_ray(address: str) -> dict[str, Any]:
    """Ask the Serve controller of the cluster at ``address`` (joins it as a driver)."""
    import ray
    from ray.serve.context import _get_global_client

    fd = os.dup(1)
    os.dup2(2, 1)  # Ray's start-up chatter goes to stderr, not into the JSON
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            return summarize_serve(_get_global_client().get_serve_details())
        finally:
            ray.shutdown()
    finally:
        sys.stdout.flush()
        os.dup2(fd, 1)
        os.close(fd)


def collect(url: str, dashboard: str | None, ray_address: str | None,
            token: str | None = None) -> dict[str, Any]:
    out = app_status(url)
    serve: dict[str, Any] | None = None
    errors: list[str] = []
    if dashboard:
        try:
            serve, out["serveSource"] = serve_from_dashboard(dashboard, token), dashboard
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"dashboard {dashboard}: {exc!r}")
    if serve is None and ray_address:
        try:
            serve, out["serveSource"] = serve_from_ray(ray_address), f"ray {ray_address}"
        except Exception as exc:
            errors.append(f"ray {ray_address}: {exc!r}")
    out["serve"] = serve
    if errors:
        out["serveErrors"] = errors
    return out


def render(status: dict[str, Any]) -> str:
    lines = [f"application {status['url']}: {'ready' if status.get('ready') else 'NOT READY'}"]
    health = status.get("health") or {}
    checks = health.get("checks") or health.get("dependencies") or {}
    if isinstance(checks, dict):
        for dep, detail in checks.items():
            lines.append(f"  {dep}: {detail}")
    serve = status.get("serve")
    if serve is None:
        lines.append("deployments: unknown (give --dashboard URL or --ray-address ADDRESS)")
        lines.extend(f"  {e}" for e in status.get("serveErrors", []))
    else:
        for app_name, app in serve.items():
            lines.append(f"Serve application {app_name}: {app['status']}")
            for dep_name, d in app["deployments"].items():
                reps = ", ".join(f"{n} {s}" for s, n in d["replicas"].items()) or "no replicas"
                auto = " (autoscaling)" if d["autoscaling"] else ""
                lines.append(f"  {dep_name:<24} {d['status']:<10} target {d['targetReplicas']}"
                             f"{auto}: {reps} on {', '.join(d['nodes'])}")
    m = status.get("metrics") or {}
    if "error" in m:
        lines.append(f"metrics: {m['error']}")
    else:
        buffers = ", ".join(f"{t} {v:g}" for t, v in m["conveyor_buffer_depth"].items()) or "empty"
        lines += [
            f"connections {m['conveyor_connections']:g}, users online {m['conveyor_users_online']:g}",
            f"buffers: {buffers}; hub mailboxes {m['conveyor_hub_mailbox_depth']:g}",
            f"outbox: {m['conveyor_outbox_pending']:g} pending, oldest "
            f"{m['conveyor_outbox_lag_seconds']:.1f} s",
            f"delivery: {m['conveyor_deliveries_pending']:g} stored and not receipted, oldest "
            f"{m['conveyor_delivery_lag_seconds']:.1f} s; "
            f"{m['conveyor_deliveries_unreceipted']:g} sent to sockets awaiting receipts",
        ]
    return "\n".join(lines)
