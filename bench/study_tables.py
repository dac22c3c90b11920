"""Seed-by-seed tables of the CPU study (docs/results.md): each arm's balanced accuracy per seed,
and for every MWA/IMWA run each replica's own accuracy beside the merged model's.

    python bench/study_tables.py /tmp/study/imwa
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def main(root: str) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for results_path in sorted(Path(root).glob("*/results.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", results_path.parent.name)
        if match:
            runs[match.group(1)][int(match.group(2))] = json.loads(results_path.read_text())
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for arm, by_seed in runs.items():
        values = [by_seed[s]["final"]["balanced_acc"] if s in by_seed else None for s in seeds]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        print(f"| {arm} | " + " | ".join(percent(v) for v in values) + f" | {percent(mean)} |")
    print("\nEach replica's own EMA teacher (last evaluation before the final merge) beside the merged model:\n")
    print("| run | replica 0 | replica 1 | merged | merged − best replica |")
    print("|---|---|---|---|---|")
    for arm, by_seed in runs.items():
        for seed, results in sorted(by_seed.items()):
            if results["imwa"]["k"] < 2:
                continue
            own = [entry["final"]["balanced_acc"] for entry in results["replicas"]]
            merged = results["final"]["balanced_acc"]
            print(f"| {arm} s{seed} | " + " | ".join(percent(v) for v in own) +
                  f" | {percent(merged)} | {100 * (merged - max(own)):+.2f} |")
    print("\nMerged model after each episode (balanced accuracy):\n")
    for arm, by_seed in runs.items():
        for seed, results in sorted(by_seed.items()):
            episodes = results["imwa"]["per_episode"]
            if len(episodes) > 1:
                line = ", ".join(f"e{e['episode']}: {percent(e['balanced_acc'])}" for e in episodes)
                extra = ""
                if episodes[0].get("strategy") == "twa":
                    accepted = sum(bool(e.get("accepted")) for e in episodes)
                    extra = f" (TWA accepted {accepted}/{len(episodes)}, labels consumed {episodes[0].get('labels_consumed')})"
                print(f"- {arm} s{seed}: {line}{extra}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/study/imwa")
