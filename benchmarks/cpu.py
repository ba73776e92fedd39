"""Where the CPU goes: CPU time of a process tree, grouped by role, over a stretch of load.

Wall-clock ratios on a shared machine move with other people's load (the bare encoder's own
figure was seen to move 3x between two runs a minute apart); the CPU time each process spends
per request does not, so the benchmarks report both. Roles come from process titles: Ray sets a
worker's title to its actor (`ray::ServeReplica:shopsearch:ImageEncoder`, `ray::ProxyActor`),
and Milvus Lite runs as a child process of the search replica.

    meter = CpuMeter(serve_run_pid)
    before = meter.sample()
    ... load ...
    cpu_s = meter.since(before)        # {"ImageEncoder": 3.1, "proxy": 1.2, ...} in seconds
"""

from __future__ import annotations

import os

import psutil

ROLES = (  # (substring of the command line, role), first match wins
    ("ImageEncoder", "image encoder"), ("TextEncoder", "text encoder"),
    ("ProductSearch", "search"), ("SearchAPI", "ingress"), ("haproxy", "haproxy"),
    ("ProxyActor", "proxy"),
    ("ServeController", "controller"), ("milvus", "milvus"), ("raylet", "raylet"),
    ("gcs_server", "gcs"), ("dashboard", "dashboard"), ("log_monitor", "log monitor"),
    ("ray.serve.scripts", "serve run driver"), ("ray::", "other ray workers"),
)


def role(proc: psutil.Process) -> str:
    """The role of a process in the graph, from its command line ("other" if unknown)."""
    try:
        line = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "other"
    return next((name for key, name in ROLES if key in line), "other")


def _cpu_s(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return times.user + times.system


class CpuMeter:
    """CPU seconds (user + system) of a process and all its descendants, per role."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)

    def sample(self) -> dict[int, tuple[str, float]]:
        """{pid: (role, cpu seconds so far)} of the tree now."""
        out = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            cpu = _cpu_s(proc)
            if cpu is not None:
                out[proc.pid] = (role(proc), cpu)
        return out

    def since(self, before: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU seconds per role spent since `before` (a process started since counts all of
        its time; one that exited since is lost, so sample around steady load only)."""
        spent: dict[str, float] = {}
        for pid, (name, cpu) in self.sample().items():
            spent[name] = spent.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
        return spent


def own_cpu_s() -> float:
    """CPU seconds this process has used so far (all its threads)."""
    times = psutil.Process(os.getpid()).cpu_times()
    return times.user + times.system
