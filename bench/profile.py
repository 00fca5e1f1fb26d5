"""Sampling profiles of chosen process groups during a load point (``py-spy``).

``Profiler(groups, out_dir)`` starts ``py-spy record`` on every live process whose
``proc_cpu`` group is in ``groups`` (``Gateway``, ``stages``, ...); ``stop()`` ends them
and leaves, per process, a collapsed-stack file ``<group>-<pid>.txt`` (one line per
distinct stack, ``frame;frame;... count``: the input of every flame-graph tool, e.g.
speedscope or ``inferno-flamegraph``) and returns each one's top frames. The samples
count only time on the CPU (``py-spy``'s default, idle threads excluded).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import proc_cpu


def py_spy() -> str | None:
    """The ``py-spy`` executable beside this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, groups: tuple[str, ...], out_dir: Path, rate: int = 99) -> None:
        self.groups = groups
        self.out_dir = out_dir
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid, group in proc_cpu.processes():
            if group not in self.groups:
                continue
            path = self.out_dir / f"{group}-{pid}.txt"
            proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                 "--output", str(path), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((str(path), proc))
        return self

    def stop(self, top: int = 12) -> dict[str, Any]:
        """End every recording; per file: samples and the top frames by own and total time."""
        for _, proc in self.procs:
            proc.send_signal(signal.SIGINT)
        out: dict[str, Any] = {}
        for path, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if Path(path).exists():
                out[Path(path).name] = top_frames(Path(path), top)
        return out


def top_frames(path: Path, top: int = 12) -> dict[str, Any]:
    """From collapsed stacks: the frames with most samples on top of the stack (own) and
    anywhere in it (total), as percentages of all samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def pct(counter: Counter[str]) -> list[list[Any]]:
        return [[frame, round(100 * n / samples, 1)] for frame, n in counter.most_common(top)]

    return {"samples": samples, "ownPct": pct(own) if samples else [],
            "totalPct": pct(total) if samples else []}
