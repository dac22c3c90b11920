"""Shared benchmark helpers: machine idleness, peak memory, and a header that states the conditions."""
from __future__ import annotations

import os
import platform
import resource
import time

import torch


def machine_load() -> tuple[float, str]:
    """1-minute load average and a verdict; benchmarks on a busy 2-core machine are not comparable."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    verdict = "idle" if load < 0.5 else ("lightly loaded" if load < 0.5 * cores else "BUSY (figures not comparable)")
    return load, verdict


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def header(title: str, threads: int) -> str:
    load, verdict = machine_load()
    return (f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M:%S')} | torch {torch.__version__} | "
            f"{platform.processor() or platform.machine()} | {os.cpu_count()} cores | threads {threads} | "
            f"load before start {load:.2f} ({verdict})")
