"""IMWA's overhead: K=2, E=4 on one process against two plain K=1 runs back to back.

    python -m bench.imwa_overhead --steps 400 [--dataset-root /tmp/cifar10]

Both arms do the same replica-steps (2 x T). The overhead is what IMWA adds: merges, switching
between resident replicas, the merged model's evaluations and the merge checkpoints. Times are
the runs' own training wall time (`results.json`, excluding process start-up and data loading).
Then peak memory (max RSS of the whole process) for K = 1, 2, 4 on one device.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench._common import header, run_main


def run(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    """Run main.py in a child process; returns (results.json, peak RSS in MB of that child)."""
    results, (peak,) = run_main(overrides, run_dir)
    return results, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="T, steps per replica")
    parser.add_argument("--memory-steps", type=int, default=40, help="steps of the K=1,2,4 memory runs")
    parser.add_argument("--dataset-root", default="/tmp/cifar10",
                        help="CIFAR-10 JPEG tree; if missing, the bundled digits are used")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if Path(args.dataset_root, "train").is_dir():
        base = ["experiment=cpu_cifar10_lt", f"dataset.root={args.dataset_root}", "train.precision=bf16",
                "train.channels_last=true"]
    else:
        base = ["experiment=quickstart"]
    base += [f"train.iterations={args.steps}", f"train.eval_every={args.steps // 4}",
             f"train.num_threads={args.threads}"]
    print(header("IMWA overhead: K=2 E=4 against two K=1 runs", args.threads))
    print(f"# {' '.join(base)}")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        plain = [run([*base, f"seed={seed}"], out / f"plain{seed}") for seed in (0, 1)]
        imwa, _ = run([*base, "imwa.k=2", "imwa.episodes=4"], out / "imwa")
        plain_seconds = sum(results["wall_time_s"] for results, _ in plain)
        merge_seconds = sum(entry["seconds"] for entry in imwa["imwa"]["per_episode"])
        overhead = imwa["wall_time_s"] / plain_seconds - 1
        print(f"two K=1 runs of {args.steps} steps : {plain_seconds:8.1f} s")
        print(f"K=2, E=4 ({2 * args.steps} replica-steps): {imwa['wall_time_s']:8.1f} s "
              f"(merges themselves {merge_seconds:.2f} s)")
        print(f"overhead                     : {overhead:+8.2%}")
        memory = {}
        for k in (1, 2, 4):
            _, memory[k] = run([*base, f"train.iterations={args.memory_steps}", f"train.eval_every={args.memory_steps}",
                                f"imwa.k={k}", "imwa.episodes=2"], out / f"memory{k}")
        print("peak memory (RSS, whole process): " + ", ".join(f"K={k}: {mb:.0f} MB" for k, mb in memory.items()))


if __name__ == "__main__":
    main()
