"""One replica on one process (D=1) against the same replica on two (imwa.data_parallel=2).

    python -m bench.data_parallel [--steps 200] [--device cpu|cuda] [--algorithm fixmatch]

Both arms train the same run (quick start, same global batch and data) for `--steps` steps, one
thread per process on the CPU (as torchrun sets it), one GPU per process on CUDA. Reported: the
replica's training throughput (images of the whole batch per second of the run's own training
time, from results.json, so process start and data loading are left out), and the peak resident
memory (and peak GPU memory) of each process. D=2 runs with model.sync_batchnorm=true.
On a 2-core CPU D=2 cannot be faster: the two processes share the cores a D=1 run would use
with two threads, and pay the per-step all-reduces on top; the figure says what that costs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import header

ROOT = Path(__file__).resolve().parents[1]


def launch(world: int, overrides: list[str], run_dir: Path) -> list[float]:
    """Run main.py in `world` processes (torchrun's environment); peak RSS in MB of each."""
    port = 29000 + os.getpid() % 1000
    command = [sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={run_dir}", "train.progress=false"]
    children = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        log = open(run_dir.with_suffix(f".rank{rank}.log"), "w")   # noqa: SIM115 (closed when the child ends)
        children.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    peaks = []
    for child, log in children:
        _, status, usage = os.wait4(child.pid, 0)
        log.close()
        if status != 0:
            raise SystemExit(f"run failed ({status}): see {run_dir}.rank*.log")
        peaks.append(usage.ru_maxrss / 1024)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algorithm", default="fixmatch")
    args = parser.parse_args()
    print(header("D=1 vs D=2 (imwa.data_parallel)", 1, args.device))
    base = ["experiment=quickstart", f"algorithm={args.algorithm}", f"train.iterations={args.steps}",
            f"train.eval_every={args.steps}", f"device={args.device}", "train.num_threads=1"]
    arms = {"D=1, 1 process": (1, []),
            "D=2, 2 processes": (2, ["imwa.data_parallel=2", "model.sync_batchnorm=true"])}
    if args.device == "cpu":
        arms["D=1, 1 process, 2 threads"] = (1, ["train.num_threads=2"])
    print("| arm | steps/s | images/s (whole batch) | peak RSS per process (MB) | peak GPU memory (MB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, (world, extra)) in enumerate(arms.items()):
            run_dir = Path(scratch) / f"arm{index}"
            peaks = launch(world, [*base, *extra], run_dir)
            results = json.loads((run_dir / "results.json").read_text())
            steps_per_s = args.steps / results["wall_time_s"]
            images = results["images_per_s"] * world   # results count the images of process 0's slice
            gpu = results.get("peak_gpu_memory_mb")
            print(f"| {name} | {steps_per_s:.2f} | {images:.0f} | {' / '.join(f'{peak:.0f}' for peak in peaks)} | "
                  f"{'-' if gpu is None else f'{gpu:.0f}'} |")


if __name__ == "__main__":
    main()
