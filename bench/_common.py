"""Shared benchmark helpers: machine idleness, peak memory, and a header that states the conditions."""
from __future__ import annotations

import os
import platform
import resource
import time

import torch


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(seconds: float = 1.0) -> tuple[float, str]:
    """Share of all cores busy over `seconds` *before* we start, and a verdict.

    Benchmarks on a busy 2-core machine are not comparable (two jobs slow each other 2-5x).
    """
    busy_before, total_before = _cpu_times()
    time.sleep(seconds)
    busy_after, total_after = _cpu_times()
    share = (busy_after - busy_before) / max(total_after - total_before, 1)
    verdict = "idle" if share < 0.1 else ("lightly loaded" if share < 0.3 else "BUSY: figures not comparable")
    return share, verdict


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def header(title: str, threads: int) -> str:
    share, verdict = machine_busy()
    return (f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M:%S')} | torch {torch.__version__} | "
            f"{platform.processor() or platform.machine()} | {os.cpu_count()} cores | threads {threads} | "
            f"CPU busy before start {share:.0%} ({verdict})")
