"""Seed-by-seed tables of the CPU studies (docs/results.md).

    python -m bench.study_tables imwa /tmp/study/imwa
    python -m bench.study_tables algorithms /tmp/study
    python -m bench.study_tables acr_tau /tmp/study
    python -m bench.study_tables table /tmp/study
    python -m bench.study_tables top /tmp/study

`imwa`: each arm's balanced accuracy per seed with mean ± sample std, each arm's difference from
the plain FixMatch K=1 run of the same seed, every MWA/IMWA replica's own accuracy beside the
merged model's, and the merged model after each episode. `algorithms`: every algorithm on
consistent and reversed unlabeled data, per seed, and its difference from supervised training on
the same labels (the consistent supervised and FixMatch runs are the imwa/ runs of that seed).
`acr_tau`: ACR with the paper's estimate beside the official code's (the default), seed by seed:
balanced accuracy and the adaptive tau read from each run's TensorBoard stream. `table`: the whole table
(every algorithm on consistent, reversed and uniform data), paired with supervised and FixMatch by seed,
head/medium/tail and cost; `top`: IMWA, MWA and the compute-matched K=1 on top of chosen algorithms.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

Runs = dict[str, dict[int, dict]]  # arm -> seed -> results.json

IMWA_BASELINE = "fixmatch_k1"
ALGORITHMS = ("supervised", "fixmatch", "daso", "acr", "acr_official")
SETTINGS = ("consistent", "reversed")
# the consistent-data baselines of the algorithm study are these imwa/ arms (same config)
CONSISTENT_FROM_IMWA = {"supervised": "supervised_consistent", IMWA_BASELINE: "fixmatch_consistent"}


def collect(root: Path) -> Runs:
    """Finished runs under `root`, keyed by arm (directory name without `_s<seed>`) and seed."""
    runs: Runs = defaultdict(dict)
    for results_path in sorted(root.glob("*/results.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", results_path.parent.name)
        if match:
            runs[match.group(1)][int(match.group(2))] = json.loads(results_path.read_text())
    return runs


def accuracy(results: dict) -> float:
    """Final balanced accuracy of the evaluated model, in percent."""
    return 100 * results["final"]["balanced_acc"]


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (just the mean for one value, empty for none)."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def seed_columns(by_seed: dict[int, dict], seeds: list[int]) -> list[str]:
    return [f"{accuracy(by_seed[s]):.2f}" if s in by_seed else "" for s in seeds]


def paired_differences(arm: dict[int, dict], reference: dict[int, dict]) -> list[float]:
    """Arm minus reference on every seed both have: the comparison the seed-by-seed design allows."""
    return [accuracy(arm[s]) - accuracy(reference[s]) for s in sorted(arm.keys() & reference.keys())]


def difference_cell(differences: list[float]) -> str:
    if not differences:
        return ""
    wins = sum(d > 0 for d in differences)
    return f"{' / '.join(f'{d:+.2f}' for d in differences)} (mean {statistics.mean(differences):+.2f}; higher on {wins}/{len(differences)})"


def imwa_tables(runs: Runs) -> None:
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    baseline = runs.get(IMWA_BASELINE, {})
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean ± std | minus {IMWA_BASELINE}, seed by seed |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for arm, by_seed in runs.items():
        values = [accuracy(by_seed[s]) for s in sorted(by_seed)]
        versus = "" if arm == IMWA_BASELINE else difference_cell(paired_differences(by_seed, baseline))
        print(f"| {arm} | " + " | ".join(seed_columns(by_seed, seeds)) + f" | {spread(values)} | {versus} |")

    print("\nEach replica's own EMA teacher (last evaluation before the final merge) beside the merged model:\n")
    print("| run | replica 0 | replica 1 | merged | merged − best replica |")
    print("|---|---|---|---|---|")
    for arm, by_seed in runs.items():
        for seed, results in sorted(by_seed.items()):
            if results["imwa"]["k"] < 2:
                continue
            own = [100 * entry["final"]["balanced_acc"] for entry in results["replicas"]]
            merged = accuracy(results)
            print(f"| {arm} s{seed} | " + " | ".join(f"{v:.2f}" for v in own) +
                  f" | {merged:.2f} | {merged - max(own):+.2f} |")

    print("\nMerged model after each episode (balanced accuracy):\n")
    for arm, by_seed in runs.items():
        for seed, results in sorted(by_seed.items()):
            episodes = results["imwa"]["per_episode"]
            if len(episodes) > 1:
                line = ", ".join(f"e{e['episode']}: {100 * e['balanced_acc']:.2f}" for e in episodes)
                extra = ""
                if episodes[0].get("strategy") == "twa":
                    accepted = sum(bool(e.get("accepted")) for e in episodes)
                    extra = f" (TWA accepted {accepted}/{len(episodes)}, labels consumed {episodes[0].get('labels_consumed')})"
                print(f"- {arm} s{seed}: {line}{extra}")


def algorithm_tables(study: Path) -> None:
    runs = dict(collect(study / "algorithms"))
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})  # the algorithm study's seeds
    imwa_runs = collect(study / "imwa")
    for imwa_arm, name in CONSISTENT_FROM_IMWA.items():
        runs[name] = {seed: results for seed, results in imwa_runs.get(imwa_arm, {}).items() if seed in seeds}
    header = ["algorithm"]
    for setting in SETTINGS:
        header += [f"{setting} s{s}" for s in seeds] + [f"{setting} mean ± std", f"{setting}: minus supervised"]
    header.append("reversed minus consistent")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for algorithm in ALGORITHMS:
        if not any(runs.get(f"{algorithm}_{setting}") for setting in SETTINGS):
            continue  # an arm this study did not run
        cells = [algorithm]
        for setting in SETTINGS:
            by_seed = runs.get(f"{algorithm}_{setting}", {})
            supervised = runs.get(f"supervised_{setting}", {})
            cells += seed_columns(by_seed, seeds)
            cells.append(spread([accuracy(by_seed[s]) for s in sorted(by_seed)]))
            cells.append("" if algorithm == "supervised" else difference_cell(paired_differences(by_seed, supervised)))
        cells.append(difference_cell(paired_differences(runs.get(f"{algorithm}_reversed", {}),
                                                         runs.get(f"{algorithm}_consistent", {}))))
        print("| " + " | ".join(cells) + " |")


TABLE = ("supervised", "fixmatch", "daso", "acr", "debiaspl", "saw", "darp", "abc", "adsh", "tras", "crest",
         "crest_plus", "cossl", "simpro", "cdmad")
TABLE_SETTINGS = ("consistent", "reversed", "uniform")


def mean_cell(values: list[float]) -> str:
    """`mean ± std` without the count (the tables say n once)."""
    if not values:
        return ""
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def paired_cell(differences: list[float]) -> str:
    """Mean paired difference and on how many seeds the arm was higher."""
    if not differences:
        return ""
    return f"{statistics.mean(differences):+.1f} ({sum(d > 0 for d in differences)}/{len(differences)})"


def whole_table(study: Path) -> None:
    """The whole table (cpu_study.sh's table sections): balanced accuracy per setting, paired with supervised and
    FixMatch by seed; head / medium / tail; the cost of each arm relative to FixMatch on the same seed."""
    runs = collect(study / "table")
    present = [name for name in TABLE if any(runs.get(f"{name}_{u}") for u in TABLE_SETTINGS)]
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    print(f"Seeds {', '.join(map(str, seeds))}; cells: mean ± sample std over the seeds that finished (n below), "
          "differences paired by seed: mean (seeds on which the arm was higher / seeds compared).\n")
    header = ["algorithm"] + [f"{u}" for u in TABLE_SETTINGS] + [f"{u}: − supervised" for u in TABLE_SETTINGS] \
        + [f"{u}: − FixMatch" for u in TABLE_SETTINGS] + ["n"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in present:
        cells = [name]
        arms = [runs.get(f"{name}_{u}", {}) for u in TABLE_SETTINGS]
        cells += [mean_cell([accuracy(arm[s]) for s in sorted(arm)]) for arm in arms]
        for reference in ("supervised", "fixmatch"):
            cells += ["" if name == reference else paired_cell(paired_differences(arm, runs.get(f"{reference}_{u}", {})))
                      for arm, u in zip(arms, TABLE_SETTINGS, strict=True)]
        cells.append("/".join(str(len(arm)) for arm in arms))
        print("| " + " | ".join(cells) + " |")

    print("\nHead, medium and tail classes (thirds by labeled count: head the 3 most frequent, tail the 4 rarest "
          "of 10), mean "
          "accuracy (%) over the seeds:\n")
    header = ["algorithm"] + [f"{u} {group}" for u in TABLE_SETTINGS for group in ("head", "medium", "tail")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in present:
        cells = [name]
        for u in TABLE_SETTINGS:
            arm = runs.get(f"{name}_{u}", {})
            cells += [f"{statistics.mean(100 * arm[s]['final'][group] for s in arm):.1f}" if arm else ""
                      for group in ("head", "medium", "tail")]
        print("| " + " | ".join(cells) + " |")

    print("\nCost relative to FixMatch on the same setting and seed (geometric mean over the pairs): images/s "
          "(images forwarded per second, each view counted) and wall time of the run:\n")
    print("| algorithm | images/s ÷ FixMatch's | wall time ÷ FixMatch's |")
    print("|---|---|---|")
    for name in present:
        pairs = [(runs[f"{name}_{u}"][s], runs[f"fixmatch_{u}"][s]) for u in TABLE_SETTINGS
                 for s in sorted(runs.get(f"{name}_{u}", {}).keys() & runs.get(f"fixmatch_{u}", {}).keys())]
        if not pairs:
            continue
        speed = statistics.geometric_mean([arm["images_per_s"] / base["images_per_s"] for arm, base in pairs])
        wall = statistics.geometric_mean([arm["wall_time_s"] / base["wall_time_s"] for arm, base in pairs])
        print(f"| {name} | {speed:.2f} | {wall:.2f} |")


def top_tables(study: Path) -> None:
    """IMWA, MWA and the compute-matched K=1 on top of the chosen algorithms, each paired by seed with the
    algorithm's own K=1 run of the table."""
    runs, table = collect(study / "top"), collect(study / "table")
    print("| arm | seeds | balanced acc. mean ± std | − the algorithm's K=1 (table), paired |")
    print("|---|---|---|---|")
    for arm, by_seed in sorted(runs.items()):
        match = re.fullmatch(r"(.+?)_(imwa_k2e4|mwa_k2e1|k1_long)_(\w+)", arm)
        if not match:
            continue
        base = table.get(f"{match.group(1)}_{match.group(3)}", {})
        print(f"| {arm} | {len(by_seed)} | {mean_cell([accuracy(by_seed[s]) for s in sorted(by_seed)])} | "
              f"{paired_cell(paired_differences(by_seed, base))} |")


def tau_curve(run_dir: Path) -> list[float]:
    """ACR's logged adaptive tau (train/tau of replica 0), in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "replica0"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("train/tau")]


def acr_tau_tables(study: Path) -> None:
    runs = collect(study / "algorithms")
    print("| setting | seed | paper's reading: bal. acc | tau first / last / mean of last quarter "
          "| official code (default): bal. acc | tau first / last / mean of last quarter | official − paper |")
    print("|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        paper, official = runs.get(f"acr_{setting}", {}), runs.get(f"acr_official_{setting}", {})
        for seed in sorted(paper.keys() & official.keys()):
            cells = [setting, str(seed)]
            for arm in (f"acr_{setting}", f"acr_official_{setting}"):
                curve = tau_curve(study / "algorithms" / f"{arm}_s{seed}")
                tail = curve[-max(1, len(curve) // 4):]
                cells += [f"{accuracy(runs[arm][seed]):.2f}",
                          f"{curve[0]:.3f} / {curve[-1]:.3f} / {statistics.mean(tail):.3f}"]
            cells.append(f"{accuracy(official[seed]) - accuracy(paper[seed]):+.2f}")
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str]) -> None:
    tables = {"imwa": lambda path: imwa_tables(collect(path)), "algorithms": algorithm_tables, "acr_tau": acr_tau_tables,
              "table": whole_table, "top": top_tables}
    if len(argv) != 2 or argv[0] not in tables:
        sys.exit("usage: python -m bench.study_tables imwa STUDY/imwa | algorithms STUDY | acr_tau STUDY | table STUDY "
                 "| top STUDY")
    tables[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
