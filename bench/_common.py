"""Shared benchmark helpers: machine idleness, peak memory, a header that states the conditions, device
synchronisation, composing the real config, and bitwise checkpoint comparisons (bench/ never imports tests/)."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ssl_imwa.checkpoint import read_checkpoint, replica_tensors


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


def header(title: str, threads: int, device: torch.device | str = "cpu") -> str:
    share, verdict = machine_busy()
    gpu = f" | {device_summary(device)}" if torch.device(device).type == "cuda" else ""
    return (f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M:%S')} | torch {torch.__version__} | "
            f"{platform.processor() or platform.machine()} | {os.cpu_count()} cores | threads {threads}{gpu} | "
            f"CPU busy before start {share:.0%} ({verdict})")


# ----- helpers for bench/gpu_smoke/ and any benchmark that may run on a GPU ----------------------
ROOT = Path(__file__).resolve().parents[1]


def run_main(overrides: list[str], run_dir: Path, world: int = 1) -> tuple[dict[str, Any], list[float]]:
    """`python main.py` in `world` child processes (torchrun's environment when world > 1, one thread
    each as torchrun sets it); returns the run's results.json and each process's peak RSS in MB."""
    command = [sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={run_dir}", "train.progress=false"]
    port = 29000 + os.getpid() % 1000
    children = []
    for rank in range(world):
        env = dict(os.environ)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(run_dir.with_suffix(f".rank{rank}.log"), "w")   # noqa: SIM115 (closed when the child ends)
        children.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    peaks = []
    for child, log in children:
        _, status, usage = os.wait4(child.pid, 0)
        log.close()
        if status != 0:
            raise SystemExit(f"run failed ({status}): see {run_dir}.rank*.log")
        peaks.append(usage.ru_maxrss / 1024)
    return json.loads((run_dir / "results.json").read_text()), peaks


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA): call before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on CUDA (CPU peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak GPU memory allocated by tensors since the last reset on CUDA; peak process RSS elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def device_summary(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3, 79.2 GiB, sm_90' for a GPU; the processor for the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2 ** 30:.1f} GiB, sm_{props.major}{props.minor}"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compose_config(overrides: list[str], run_dir: Path | str = ".") -> Any:
    """The real config, unvalidated and without the progress bar (ssl_imwa.composition).

    Pass it to `ssl_imwa.config.validate` to type-check it, or to `ssl_imwa.run.run` to train.
    """
    from ssl_imwa.composition import compose_config as compose_package_config

    return compose_package_config([*overrides, "train.progress=false"], run_dir)


def checkpoint_tensors(run_dir: Path | str, name: str = "latest.pt") -> dict[str, torch.Tensor]:
    """Every replica's student, teacher and optimiser tensors in a checkpoint, flattened, on the CPU."""
    return replica_tensors(read_checkpoint(Path(run_dir) / "checkpoints" / name))


def tensor_differences(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> list[str]:
    """What differs between two flattened tensor dicts, bitwise (empty: identical), one line per key."""
    lines = [f"{key}: only in the first" for key in sorted(left.keys() - right.keys())]
    lines += [f"{key}: only in the second" for key in sorted(right.keys() - left.keys())]
    for key in sorted(left.keys() & right.keys()):
        a, b = left[key], right[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b):
            differing = int((a != b).sum()) if a.numel() else 0
            detail = ""
            if a.is_floating_point():
                detail = f", max |diff| {float((a.double() - b.double()).abs().nan_to_num(float('inf')).max()):.3g}"
            lines.append(f"{key}: {differing} of {a.numel()} elements differ{detail}")
    return lines
