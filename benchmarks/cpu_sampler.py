"""Where the host's CPU goes during a benchmark part: CPU seconds per process, by role.

The served path is a chain of processes (benchmark clients -> Serve proxy -> ingress replica ->
engine replica -> engine core); the one that runs at ~100% of a core while the others wait is
the one that bounds it. `CpuSampler` reads every process's CPU times at start and stop and
names each by its Ray role (Ray sets the process title, e.g. `ray::ServeReplica:app:Ingress`).
"""
from __future__ import annotations

import time

ROLES = (("ProxyActor", "proxy"), ("Ingress", "ingress"), ("LLMServer", "engine replica"),
         ("engine.core_process", "engine core"), ("ServeController", "serve controller"),
         ("raylet", "raylet"), ("gcs_server", "gcs"))


def _role(proc) -> str | None:
    try:
        line = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None
    for needle, role in ROLES:
        if needle in line:
            return role
    return None


def _cpu_seconds(proc) -> float | None:
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except Exception:  # noqa: BLE001
        return None


class CpuSampler:
    """`start()` before a part, `stop()` after it: {role: percent of one core}, plus `clients`
    for the benchmark's own process and its children (the HTTP client processes)."""

    def __init__(self):
        import psutil
        self._psutil = psutil
        self._start: dict[int, tuple[str, float]] = {}
        self._t0 = 0.0

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        me = self._psutil.Process()
        ours = {me.pid, *(c.pid for c in me.children(recursive=False))}
        snap = {}
        for proc in self._psutil.process_iter():
            role = _role(proc) or ("clients" if proc.pid in ours else None)
            seconds = _cpu_seconds(proc) if role else None
            if seconds is not None:
                snap[proc.pid] = (role, seconds)
        return snap

    def start(self) -> None:
        self._start, self._t0 = self._snapshot(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        end, wall = self._snapshot(), time.perf_counter() - self._t0
        used: dict[str, float] = {}
        for pid, (role, seconds) in end.items():
            before = self._start.get(pid, (role, 0.0))[1]
            used[role] = used.get(role, 0.0) + seconds - before
        return {role: round(100 * s / wall, 1) for role, s in sorted(used.items()) if wall > 0}
