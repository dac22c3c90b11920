"""Bad inputs, tried as a user would: does each fail early, in a line or two, naming the key or path?

Every case launches `python main.py experiment=quickstart <case>` in a fresh process (a few seconds
each, about 4 minutes for the battery on 2 CPU cores) and records:
- `failed`: the exit status is not 0;
- `early`: the run directory holds no checkpoint and no evaluation (no training happened);
- `short`: an error message of at most two lines (log lines of work done before it are not counted);
- `named`: the output contains the key, value or path the case is about.
A case passes when all four hold. Then the faults of `bench/fault_scenarios.py` (kills, a full
disk, damaged files, a bad sweep job, a checkpoint carrying code), each checked for nothing lost
(`--no-scenarios` leaves them out). The tables go to stdout, and to `--out` as markdown.

    python -m bench.fault_battery --out docs/fault_battery.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fault_scenarios import Outcome, run_scenarios

ROOT = Path(__file__).resolve().parents[1]
BASE = ["experiment=quickstart", "train.iterations=20", "train.eval_every=10", "train.num_threads=1",
        "train.progress=false"]

HYDRA_NOTE = ("An unknown key without `+`, a value of the wrong type and an unknown config-group option would be "
              "refused by Hydra while it composes the config, in its own 3 to 16 lines; main.py composes the "
              "command line first (ssl_imwa.preflight) and says each in one line (an unknown key with the "
              "closest key, an unknown option with the options there are).")
SYNTAX_PLUGIN = "import torch\ndef losses(:\n"
NO_LOSSES_PLUGIN = ("from ssl_imwa.algorithm import Algorithm\nfrom ssl_imwa.algorithms.fixmatch import FixMatchConfig\n"
                    "from ssl_imwa.algorithm import register_algorithm\n\n@register_algorithm('no_losses')\n"
                    "class NoLosses(Algorithm):\n    Config = FixMatchConfig\n")


@dataclass(frozen=True)
class Case:
    arguments: tuple[str, ...]
    names: str          # what the message must contain
    prepare: str = ""   # "complete": the run directory holds a finished run; "corrupt": one with a broken latest.pt;
    # "damaged_yaml" / "edited_algorithm": a stopped run whose config.yaml has a YAML error / another algorithm.name;
    # "foreign_checkpoint": a stopped run holding the checkpoints of another seed's run; "black_folder": an image
    # folder of all-black images at {data}; "no_checkpoints": a finished run without its checkpoints/;
    # "refused_launch": a finished run after a refused launch of algorithm=supervised; "empty_config": a finished
    # run with an empty config.yaml; "locked": an empty directory whose lock a live process holds; "empty_dir"


def _cases() -> list[Case]:
    c = lambda names, *arguments, prepare="": Case(tuple(arguments), names, prepare)
    return [
        # unknown keys, wrong types, unknown choices
        c("train.foo", "train.foo=1"), c("bogus", "+train.bogus=1"), c("train.lr", "train.lr=fast"),
        c("nope", "algorithm=nope"), c("nope", "dataset=nope"), c("resnet999", "model.name=resnet999"),
        c("nope", "algorithm.name=nope"), c("train.schedule", "train.schedule=linear"),
        c("train.precision", "train.precision=fp8"), c("imwa.merge", "imwa.merge=greedy"),
        c("imwa.momentum", "imwa.momentum=bogus"), c("imwa.twa.parameterisation", "imwa.twa.parameterisation=bogus"),
        c("imwa.twa.data", "imwa.twa.data=bogus"), c("imwa.twa.bn", "imwa.twa.bn=bogus"),
        c("imwa.twa.stps", "imwa.twa.stps=3"), c("did you mean imwa.episodes", "imwa.episdoes=3"),
        c("dataset.unlabeled", "dataset.unlabeled=bogus"), c("dataset.protocol", "dataset.protocol=bogus"),
        c("algorithm.weak_pass", "algorithm.weak_pass=bogus"), c("algorithm.ema.buffers", "algorithm.ema.buffers=bogus"),
        c("device", "device=tpu"),
        # values out of range
        c("algorithm.threshold", "algorithm.threshold=1.5"), c("algorithm.threshold", "algorithm.threshold=-0.5"),
        c("algorithm.lambda_u", "algorithm.lambda_u=-1"), c("algorithm.temperature", "algorithm.temperature=0"),
        c("algorithm.ema.decay", "algorithm.ema.decay=1.5"), c("train.momentum", "train.momentum=1.5"),
        c("train.weight_decay", "train.weight_decay=-1"), c("model.bn_momentum", "model.bn_momentum=2"),
        c("train.mu", "train.mu=0"), c("train.lr", "train.lr=inf"), c("train.lr", "train.lr=nan"),
        c("train.lr", "train.lr=-1"), c("train.eval_batch_size", "train.eval_batch_size=0"),
        c("train.num_threads", "train.num_threads=-1"), c("train.batch_size", "train.batch_size=0"),
        c("train.iterations", "train.iterations=0"), c("train.eval_every", "train.eval_every=0"),
        c("train.checkpoint_every", "train.checkpoint_every=-1"), c("train.log_every", "train.log_every=0"),
        c("train.stop_at", "train.stop_at=-1"), c("imwa.k", "imwa.k=0"), c("imwa.episodes", "imwa.episodes=0"),
        c("imwa.episodes", "imwa.episodes=40"), c("imwa.episodes", "imwa.episodes=3"),
        c("imwa.timeout_s", "imwa.timeout_s=0"), c("imwa.twa.steps", "imwa.merge=twa", "imwa.twa.steps=0"),
        c("imwa.twa.lr", "imwa.merge=twa", "imwa.twa.lr=-1"),
        c("imwa.twa.batch_size", "imwa.merge=twa", "imwa.twa.batch_size=0"),
        c("dataset.imbalance", "dataset.imbalance=0.5"), c("dataset.n_max", "dataset.n_max=0"),
        c("dataset.n_max", "dataset.n_max=100000"), c("dataset.m_max", "dataset.m_max=-1"),
        c("dataset.val_per_class", "dataset.val_per_class=-1"),
        c("dataset.val_per_class", "dataset.val_per_class=1000"), c("dataset.image_size", "dataset.image_size=0"),
        c("dataset.cutout_fraction", "dataset.cutout_fraction=1.5"),
        c("dataset.crop_pad_fraction", "dataset.crop_pad_fraction=-0.1"), c("seed", "seed=-1"),
        c("cuda:7", "device=cuda:7"),
        c("algorithm.queue_size", "algorithm=daso", "algorithm.queue_size=0"),
        c("algorithm.proto_temperature", "algorithm=daso", "algorithm.proto_temperature=0"),
        c("algorithm.warmup_steps", "algorithm=daso", "algorithm.warmup_steps=-1"),
        c("algorithm.dist_update_period", "algorithm=daso", "algorithm.dist_update_period=0"),
        c("algorithm.interp_alpha", "algorithm=daso", "algorithm.interp_alpha=2"),
        c("algorithm.estimate_momentum", "algorithm=acr", "algorithm.estimate_momentum=1.5"),
        c("algorithm.epoch_length", "algorithm=acr", "algorithm.epoch_length=0"),
        c("algorithm.tau_max", "algorithm=acr", "algorithm.tau_max=-1"),
        # data that is not there
        c("dataset.root", "dataset=imagefolder"), c("/nonexistent", "dataset=imagefolder", "dataset.root=/nonexistent"),
        c("/nonexistent", "dataset=cifar10_lt", "dataset.root=/nonexistent", "model=small_cnn"),
        c("/nonexistent", "dataset=stl10_lt", "dataset.root=/nonexistent", "model=small_cnn"),
        c("/nonexistent", "dataset=cifar10_jpeg_lt", "dataset.root=/nonexistent", "model=small_cnn"),
        # plugins
        c("no_such_module", "plugins=[no_such_module]"), c("syntax_plugin.py:2", "plugins=[syntax_plugin]"),
        c("does not define losses", "plugins=[no_losses_plugin]", "algorithm.name=no_losses"),
        # resume and run directories
        c("nothing to resume", "resume=true"),
        c("train.lr", "resume=true", "train.lr=0.1", prepare="complete"),
        c("resume=true", prepare="complete"),
        c("latest.pt", "resume=true", prepare="corrupt"),
        c("/sys/ssl_imwa_battery", "hydra.run.dir=/sys/ssl_imwa_battery/run"),
        c("results.json", "resume=true", prepare="no_checkpoints"),
        c("command line has supervised", "resume=true", "algorithm=supervised", prepare="refused_launch"),
        c("config.yaml", "resume=true", prepare="empty_config"),
        c(".lock", prepare="locked"),
        c("there is no run to resume", "resume=true", prepare="empty_dir"),
        # composition mistakes said in one line (not Hydra's 8-16), empty classes, odd run directories
        c("did you mean train.iterations", "train.iteratons=5"),
        c("did you mean algorithm=fixmatch", "algorithm=fixmatc"), c("train.lr=[1", "train.lr=[1"),
        c("dataset.imbalance=1e+09", "dataset.imbalance=1e9"), c("dataset.imbalance=100", "dataset.imbalance=100"),
        c("train.batch_size=500", "train.batch_size=500"),
        c("shorter hydra.run.dir", "hydra.run.dir=/tmp/" + "a" * 300),
        c("/sys/ssl_imwa_battery_ü", "hydra.run.dir='/sys/ssl_imwa_battery_ü/run'"),
        c("loss is not finite", "train.lr=1e6"),
        c("channel 0", "dataset=imagefolder", "dataset.root={data}", "model=small_cnn", prepare="black_folder"),
        c("config.yaml", "resume=true", prepare="damaged_yaml"),
        c("config.yaml", "resume=true", prepare="edited_algorithm"),
        c("seed: checkpoint has 1, config has 0", "resume=true", prepare="foreign_checkpoint"),
    ]


def _data_dir(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}_data"


def _train(run_dir: Path, env: dict[str, str], *extra: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "main.py"), *BASE, *extra, f"hydra.run.dir={run_dir}"], env=env,
                   capture_output=True, check=True, timeout=600)


_HELD_LOCKS: list = []   # prepare="locked": run directory locks this process holds


def _prepare(run_dir: Path, kind: str, env: dict[str, str]) -> None:
    if not kind:
        return
    if kind == "black_folder":
        from PIL import Image

        for split in ("train", "test"):
            for name in ("a", "b"):
                (_data_dir(run_dir) / split / name).mkdir(parents=True)
                for index in range(4):
                    Image.new("RGB", (8, 8)).save(_data_dir(run_dir) / split / name / f"{index}.png")
        return
    if kind in ("empty_dir", "locked"):
        run_dir.mkdir(parents=True)
        if kind == "locked":   # held (flock) by this process until it exits, as a live run holds it
            from ssl_imwa.rundir import RunDirectoryLock

            _HELD_LOCKS.append(RunDirectoryLock(run_dir))
            _HELD_LOCKS[-1].acquire()
        return
    stopped = kind in ("damaged_yaml", "edited_algorithm", "foreign_checkpoint")
    _train(run_dir, env, *(["train.stop_at=10"] if stopped else []))
    record = run_dir / "config.yaml"
    if kind == "damaged_yaml":
        record.write_text(record.read_text() + "train: [oops\n")
    if kind == "edited_algorithm":
        record.write_text(record.read_text().replace("name: fixmatch", "name: acr"))
    if kind == "foreign_checkpoint":
        other = run_dir.parent / f"{run_dir.name}_other"
        _train(other, env, "train.stop_at=10", "seed=1")
        for path in (other / "checkpoints").glob("*.pt"):
            path.replace(run_dir / "checkpoints" / path.name)
    if kind == "no_checkpoints":     # a finished run whose checkpoints/ was deleted
        shutil.rmtree(run_dir / "checkpoints")
    if kind == "refused_launch":     # a fresh launch of another algorithm into it was refused first
        subprocess.run([sys.executable, str(ROOT / "main.py"), *BASE, "algorithm=supervised",
                        f"hydra.run.dir={run_dir}"], env=env, capture_output=True, check=False, timeout=600)
    if kind == "empty_config":
        record.write_text("")
    if kind == "corrupt":
        for merge in (run_dir / "checkpoints").glob("merge_*.pt"):
            merge.unlink()
        (run_dir / "checkpoints" / "latest.pt").write_bytes(b"half a checkpoint")


def _message_lines(output: str) -> list[str]:
    """The error message: from the `error:` line on (log lines of the work before it are not part of
    it), or, for Hydra's own messages, every line that is not a log line."""
    lines = [line for line in output.splitlines() if line.strip()]
    starts = [index for index, line in enumerate(lines) if line.startswith("error:")]
    if starts:
        return lines[starts[0]:]
    return [line for line in lines if not line.startswith("[20")]


def run_case(case: Case, run_dir: Path, env: dict[str, str]) -> dict[str, object]:
    _prepare(run_dir, case.prepare, env)
    trained_before = len(list(run_dir.glob("checkpoints/*.pt"))) if run_dir.exists() else 0
    given_dir = [argument for argument in case.arguments if argument.startswith("hydra.run.dir=")]
    typed = [argument.replace("{data}", str(_data_dir(run_dir))) for argument in case.arguments]
    arguments = [*BASE, *typed, *([] if given_dir else [f"hydra.run.dir={run_dir}"])]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *arguments], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    output = (result.stdout + result.stderr).strip()
    lines = _message_lines(output)
    metrics = run_dir / "metrics.jsonl"
    trained = (len(list(run_dir.glob("checkpoints/*.pt"))) > trained_before
               or (not case.prepare and metrics.exists() and metrics.stat().st_size > 0))
    verdict = {"failed": result.returncode != 0, "early": not trained, "short": len(lines) <= 2,
               "named": case.names in output}
    return {**verdict, "passed": all(verdict.values()), "seconds": seconds, "lines": len(lines),
            "first_line": lines[0] if lines else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--only", type=int, nargs="*", help="case numbers to run (default: all)")
    parser.add_argument("--no-scenarios", action="store_true",
                        help="only the bad inputs, not the faults of bench/fault_scenarios.py")
    args = parser.parse_args()
    cases = _cases()
    chosen = args.only or list(range(1, len(cases) + 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault_battery_") as scratch:
        plugins = Path(scratch) / "plugins"
        plugins.mkdir()
        (plugins / "syntax_plugin.py").write_text(SYNTAX_PLUGIN)
        (plugins / "no_losses_plugin.py").write_text(NO_LOSSES_PLUGIN)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugins)])}
        env.pop("HYDRA_FULL_ERROR", None)
        for number in chosen:
            case = cases[number - 1]
            row = run_case(case, Path(scratch) / f"case{number:02d}", env)
            rows.append((number, case, row))
            print(f"{number:2d} {'pass' if row['passed'] else 'FAIL'} {' '.join(case.arguments):55s} "
                  f"{row['first_line'][:110]}", flush=True)
        scenarios = [] if args.no_scenarios or args.only else run_scenarios(Path(scratch) / "scenarios", env)
    passed = sum(row["passed"] for _, _, row in rows)
    survived = sum(outcome.survived for _, outcome in scenarios)
    summary = (f"{len(rows) + len(scenarios)} cases: {passed} of {len(rows)} bad inputs fail early, in at most two "
               f"lines, naming the key or path; {survived} of {len(scenarios)} faults survived with nothing lost")
    print(summary)
    if args.out:
        table = ["| # | input | failed | early | ≤2 lines | named | first line |", "|---|---|---|---|---|---|---|"]
        mark = lambda flag: "yes" if flag else "**no**"
        for number, case, row in rows:
            given = " ".join(case.arguments) + (f" (on a {case.prepare} run)" if case.prepare else "")
            first = str(row["first_line"]).replace("|", "\\|")
            table.append(f"| {number} | `{given}` | {mark(row['failed'])} | {mark(row['early'])} | "
                         f"{mark(row['short'])} ({row['lines']}) | {mark(row['named'])} | {first} |")
        args.out.write_text("# Fault battery: bad inputs\n\nGenerated by `python -m bench.fault_battery --out "
                            f"{args.out}` (base: `{' '.join(BASE)}`).\n\n**{summary}.**\n\n{HYDRA_NOTE}\n\n"
                            + "\n".join(table) + "\n" + _scenario_table(scenarios))
    return 0 if passed == len(rows) and survived == len(scenarios) else 1


def _scenario_table(scenarios: list[tuple[str, Outcome]]) -> str:
    if not scenarios:
        return ""
    rows = [f"| {name} | {'yes' if outcome.survived else '**no**'} | {outcome.note.replace('|', '/')} |"
            for name, outcome in scenarios]
    return ("\n## Faults (bench/fault_scenarios.py)\n\nEach made for real and checked against an uninterrupted "
            "reference run.\n\n| fault | survived, nothing lost | what happened |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
