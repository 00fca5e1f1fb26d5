"""CPU time per process group on this machine, from ``/proc`` accounting.

``snapshot()`` reads every process's user+system time and names its group from its
command line: Ray actors and Serve replicas by class (``ray::ServeReplica:app:Gateway``
→ ``Gateway``, ``ray::ConnectionHub`` → ``ConnectionHub``), PostgreSQL backends as
``postgres``, Ray's own daemons as ``ray-system``, this process as ``load-client``.
``delta(before, after)`` gives seconds of CPU per group between two snapshots.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "runtime_env", "log_monitor",
               "monitor.py", "ray_client_server", "default_worker")


def group_of(pid: int, cmdline: str) -> str | None:
    if pid == os.getpid():
        return "load-client"
    if cmdline.startswith("ray::"):
        name = cmdline[5:].split(" ", 1)[0]
        if name.startswith("ServeReplica:"):
            name = name.split(":")[-1]
        name = name.split(".", 1)[0]  # "Actor.method" while a method runs
        return {"ProxyActor": "serve-proxy", "ServeController": "serve-controller",
                "IDLE": "ray-system"}.get(name, name)
    if cmdline.startswith("postgres") or "/bin/postgres" in cmdline:
        return "postgres"
    if any(d in cmdline for d in RAY_DAEMONS):
        return "ray-system"
    return None


def processes() -> list[tuple[int, str]]:
    """(pid, group) of every live process that belongs to a group."""
    out: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        group = group_of(int(entry.name), cmdline.strip())
        if group is not None:
            out.append((int(entry.name), group))
    return out


def snapshot() -> dict[str, float]:
    """CPU seconds so far, summed per group, over the processes alive now."""
    out: dict[str, float] = {}
    for pid, group in processes():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        out[group] = out.get(group, 0.0) + seconds
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent per group between two snapshots (processes that started in
    between count from zero; ones that ended are lost)."""
    return {g: round(after[g] - before.get(g, 0.0), 3) for g in sorted(after)
            if after[g] - before.get(g, 0.0) > 0}
