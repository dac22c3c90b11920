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
import tempfile
from pathlib import Path

from bench._common import header, run_main


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
            results, peaks = run_main([*base, *extra], run_dir, world)
            steps_per_s = args.steps / results["wall_time_s"]
            images = results["images_per_s"] * world   # results count the images of process 0's slice
            gpu = results.get("peak_gpu_memory_mb")
            print(f"| {name} | {steps_per_s:.2f} | {images:.0f} | {' / '.join(f'{peak:.0f}' for peak in peaks)} | "
                  f"{'-' if gpu is None else f'{gpu:.0f}'} |")


if __name__ == "__main__":
    main()
