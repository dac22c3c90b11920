"""Tests for ssl_imwa.report on a synthetic Hydra-style sweep with known numbers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import yaml

from ssl_imwa import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_TO_TAIL = [0.9, 0.7, 0.5, 0.3]
# imwa.episodes follows imwa.k in these configs; both are recipe keys, so both name the group
# (with their short names K and E), in reader order.
K1 = "K=1, E=1"
K2 = "K=2, E=4"


def _config(k: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """A resolved config whose bookkeeping keys differ per run and must not split groups."""
    return {
        "seed": seed,
        "algorithm": {"name": "fixmatch"},
        "dataset": {"name": "cifar10_lt", "root": f"/data/{seed}", "imbalance_ratio": 100},
        "model": {"name": "wrn28_2"},
        "train": {"steps": 400, "lr": 0.03},
        "imwa": {"k": k, "episodes": 4 if k > 1 else 1, "merge": "mean"},
        "device": f"cuda:{seed % 2}",
        "resume": None if seed else "ckpt.pt",
        "run_dir": str(run_dir),
        "logging": {"tensorboard_dir": str(run_dir / "tensorboard"), "every": 50 + seed},
    }


def _evaluations(k: int, final_top1: float) -> list[dict[str, Any]]:
    """Test evals ending at final_top1, shaped as the trainer logs them for K=1 or K>1."""
    lines = []
    for episode in range(1, 5):
        step = episode * 100
        top1 = final_top1 - 0.01 * (4 - episode)
        common = {
            "step": step,
            "split": "test",
            "top1": top1,
            "balanced_acc": top1 - 0.05,
            "macro_f1": top1 - 0.06,
            "head": 0.9,
            "medium": top1,
            "tail": 0.4,
            "per_class": HEAD_TO_TAIL,
            "time_s": 10.0 * step,
        }
        for replica in range(k):
            # Replicas of an IMWA run score below their merge, so picking the wrong curve shows.
            replica_top1 = top1 if k == 1 else top1 - 0.05 * (replica + 1)
            lines.append(
                {
                    **common,
                    "source": "replica",
                    "replica": replica,
                    "episode": None,
                    "top1": replica_top1,
                }
            )
        lines.append({**common, "source": "merged", "replica": None, "episode": episode})
    return lines


def _write_run(
    root: Path,
    name: str,
    k: int,
    seed: int,
    status: dict[str, Any],
    results: dict[str, Any] | None,
    metrics: list[str],
) -> Path:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    # Hydra's own copy of the config must never be mistaken for a run dir.
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 999\nfoo: bar\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config(k, seed, run_dir)))
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def _results(top1: float, balanced: float, best_top1: float | None) -> dict[str, Any]:
    final = {
        "top1": top1,
        "balanced_acc": balanced,
        "macro_f1": balanced - 0.01,
        "head": 0.9,
        "medium": top1,
        "tail": 0.4,
        "per_class": HEAD_TO_TAIL,
    }
    best = (
        None
        if best_top1 is None
        else {**final, "step": 300, "selected_on": "val", "top1": best_top1}
    )
    return {
        "status": "complete",
        "final": final,
        "best": best,
        "median_last20": {"top1": top1 - 0.01, "balanced_acc": balanced - 0.01},
        "wall_time_s": 7200.0,
        "images_per_s": 1000.0,
    }


def _dead_pid() -> int:
    """The pid of a process that has already exited and been reaped."""
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(finished.stdout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """multirun/<date> with k=1 and k=2 x 3 seeds, one crashed, one in progress, one garbage."""
    root = tmp_path_factory.mktemp("multirun") / "2024-05-01_12-00-00"
    now = time.time()
    done = {"status": "complete", "pid": 1, "host": "node1", "updated": now, "error": None}
    # k=1: final top1 [0.70, 0.72, 0.74] -> 72.00 ± 2.00,
    #      balanced [0.60, 0.61, 0.62] -> 61.00 ± 1.00, no validation split so best is null.
    # k=2: final top1 [0.75, 0.78, 0.81] -> 78.00 ± 3.00,
    #      balanced [0.66, 0.66, 0.69] -> 67.00 ± 1.73, best top1 [0.80, 0.82, 0.84] -> 82.00 ± 2.00.
    table = {
        1: ([0.70, 0.72, 0.74], [0.60, 0.61, 0.62], [None, None, None]),
        2: ([0.75, 0.78, 0.81], [0.66, 0.66, 0.69], [0.80, 0.82, 0.84]),
    }
    for k, (top1s, balanced, bests) in table.items():
        for seed, (top1, bal, best) in enumerate(zip(top1s, balanced, bests, strict=True)):
            metrics = [json.dumps(e) for e in _evaluations(k, top1)]
            _write_run(
                root, f"imwa.k={k},seed={seed}", k, seed, done, _results(top1, bal, best), metrics
            )
    crashed_metrics = [json.dumps(e) for e in _evaluations(2, 0.50)]
    crashed_metrics.insert(2, '{"step": 150, "split": "test", "top1"')  # torn write
    crashed_metrics.append("not json at all")
    crashed_status = {
        "status": "running",
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "updated": now,
        "error": None,
    }
    _write_run(root, "imwa.k=2,seed=3", 2, 3, crashed_status, None, crashed_metrics)
    live_status = {
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated": now,
        "error": None,
    }
    live_metrics = [json.dumps(e) for e in _evaluations(1, 0.30)[:2]]
    _write_run(root, "imwa.k=1,seed=4", 1, 4, live_status, None, live_metrics)
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "config.yaml").write_text("seed: [unclosed\n  algorithm: {\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.fixture(scope="module")
def default_report(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    # capsys is function-scoped; redirect by hand so the report is built once for several tests.
    with capture.open("w") as handle, contextlib.redirect_stdout(handle):
        assert report.main([str(sweep), "--out", str(out)]) == 0
    return out, capture.read_text()


def _csv_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "report.csv").open(newline="") as handle:
        return {row["group"]: row for row in csv.DictReader(handle)}


def test_groups_are_labelled_by_the_differing_keys_only(default_report: tuple[Path, str]) -> None:
    out, _ = default_report
    assert list(_csv_rows(out)) == [K1, K2]


def test_table_has_hand_computed_means_and_sample_stds(default_report: tuple[Path, str]) -> None:
    _, printed = default_report
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in printed.splitlines()
        if line.startswith("| K=")
    }
    k1, k2 = rows[K1].split(" | "), rows[f"{K2} †"].split(" | ")
    # group, n, final top1, best top1, median20, balanced, head, medium, tail, wall h, images/s, notes
    assert k1[1:5] == ["3", "72.00 ± 2.00", "", "71.00 ± 2.00"]
    assert k1[5] == "61.00 ± 1.00"
    assert k1[-1].rstrip(" |") == "1 running excluded"
    assert k2[1:3] == ["3", "78.00 ± 3.00"]
    assert k2[3] == "82.00 ± 2.00"
    assert k2[5] == "67.00 ± 1.73"
    assert k2[9:11] == ["2:00:00 ± 0:00:00", "1000 ± 0"]
    assert k2[-1].rstrip(" |") == "1 crashed excluded"


def test_csv_parses_with_expected_values(default_report: tuple[Path, str]) -> None:
    out, _ = default_report
    rows = _csv_rows(out)
    k1, k2 = rows[K1], rows[K2]
    assert (k1["imwa.episodes"], k1["n"], k1["running"], k1["crashed"]) == ("1", "3", "1", "0")
    assert float(k1["final_top1_mean"]) == pytest.approx(72.0)
    assert float(k1["final_top1_std"]) == pytest.approx(2.0)
    assert k1["best_top1_mean"] == ""
    assert (k2["n"], k2["crashed"]) == ("3", "1")
    assert float(k2["final_balanced_acc_mean"]) == pytest.approx(67.0)
    assert float(k2["final_balanced_acc_std"]) == pytest.approx(3**0.5, abs=1e-4)
    assert float(k2["best_top1_mean"]) == pytest.approx(82.0)
    assert "seed" not in k1 and "device" not in k1 and "run_dir" not in k1


def test_crashed_run_is_marked_listed_and_excluded(default_report: tuple[Path, str]) -> None:
    out, printed = default_report
    crashed_line = next(line for line in printed.splitlines() if "imwa.k=2,seed=3" in line)
    assert crashed_line.startswith("- ") and "is not alive" in crashed_line
    assert "last test evaluation at step 400: top1 50.00%" in crashed_line
    assert "† Crashed or stopped runs, excluded from the means" in printed
    assert (out / "report.md").read_text() == printed.rsplit("wrote ", 1)[0]


def test_in_progress_run_is_listed(default_report: tuple[Path, str]) -> None:
    _, printed = default_report
    section = printed.split("In progress (excluded):", 1)[1].split("\n\n", 1)[0]
    assert f"imwa.k=1,seed=4 [{K1}]: in progress (pid" in section


def test_garbage_and_malformed_lines_are_reported_at_the_end(
    default_report: tuple[Path, str], sweep: Path
) -> None:
    _, printed = default_report
    skipped = [line for line in printed.splitlines() if line.startswith("skipped: ")]
    assert f"skipped: {sweep / 'garbage'}: config.yaml is not valid YAML" in "\n".join(skipped)
    metrics = sweep / "imwa.k=2,seed=3" / "metrics.jsonl"
    assert f"skipped: {metrics}: 2 malformed line(s) ignored" in skipped
    assert len(skipped) == 2  # .hydra/config.yaml and multirun.yaml are not runs
    assert printed.splitlines()[-2].startswith("skipped: ")  # last before the "wrote ..." line


def test_plots_are_readable_pngs(default_report: tuple[Path, str]) -> None:
    out, printed = default_report
    for name in ("curves.png", "episodes.png", "per_class.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100
        assert f"- {name}: " in printed


def test_include_incomplete_averages_the_crashed_run(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(sweep), "--out", str(tmp_path), "--include-incomplete"]) == 0
    k2 = _csv_rows(tmp_path)[K2]
    # [0.75, 0.78, 0.81, 0.50]: mean 71.00, deviations 4, 7, 10, -21 -> sqrt(606 / 3) = 14.21
    assert k2["n"] == "4"
    assert float(k2["final_top1_mean"]) == pytest.approx(71.0)
    assert float(k2["final_top1_std"]) == pytest.approx(14.2127, abs=1e-4)
    assert k2["best_top1_n"] == "3"  # a crashed run has no val-selected best
    assert k2["notes"] == "1 crashed included"
    assert "82.00 ± 2.00 (n=3)" in capsys.readouterr().out


def test_glob_arguments_and_no_episode_groups(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(sweep / "imwa.k=1,seed=[01]"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| all runs | 2 | 71.00 ± 1.41 |" in printed
    assert "episodes.png not written: no group has imwa.k > 1 or imwa.episodes > 1" in printed
    assert not (tmp_path / "episodes.png").exists()
    assert "skipped:" not in printed


def test_per_class_groups_selects_by_substring(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report.main([str(sweep), "--out", str(tmp_path), "--per-class-groups", "k=7"])
    assert "per_class.png not written" in capsys.readouterr().out
    assert not (tmp_path / "per_class.png").exists()


@pytest.mark.parametrize(
    ("status", "age_s", "expected_state", "reason_part"),
    [
        (
            {"status": "running", "pid": os.getpid(), "host": socket.gethostname()},
            0,
            report.RUNNING,
            "in progress",
        ),
        (
            {"status": "running", "pid": os.getpid(), "host": socket.gethostname()},
            31 * 60,
            report.CRASHED,
            "stale",
        ),
        (
            {"status": "running", "pid": 12345, "host": "another-node"},
            60,
            report.RUNNING,
            "another-node",
        ),
        (
            {"status": "failed", "pid": 1, "host": "x", "error": "CUDA OOM"},
            0,
            report.CRASHED,
            "failed: CUDA OOM",
        ),
        ({"status": "complete", "pid": 1, "host": "x"}, 0, report.CRASHED, "no results.json"),
        ({"status": "stopped", "pid": 1, "host": "x"}, 0, report.STOPPED, "train.stop_at"),
    ],
)
def test_unfinished_run_state(
    tmp_path: Path, status: dict[str, Any], age_s: float, expected_state: str, reason_part: str
) -> None:
    now = 1_700_000_000.0
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "status.json").write_text(json.dumps({**status, "updated": now - age_s}))
    run = report.load_run(tmp_path, stale_seconds=30 * 60, now=now)
    assert run.state == expected_state
    assert reason_part in run.reason
    assert run.final is None  # no metrics.jsonl: nothing to stand in for "final"


def test_null_per_class_entries_stay_missing(tmp_path: Path) -> None:
    """The trainer writes NaN as null; one such class must not drop a run from per_class.png."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    final = {"top1": 0.5, "balanced_acc": 0.4, "per_class": [0.8, None, 0.4]}
    (run_dir / "results.json").write_text(json.dumps({"status": "complete", "final": final}))
    run = report.load_run(run_dir)
    per_class = run.final["per_class"] if run.final else None
    assert per_class is not None and per_class[0] == 0.8 and per_class[1] != per_class[1]  # NaN
    summary = report.summarise(report.Group(label="all runs", settings={}, runs=[run]))
    note = report.plot_per_class([summary], None, tmp_path / "per_class.png")
    assert note.startswith("per_class.png: ")
    assert (tmp_path / "per_class.png").read_bytes()[:8] == PNG_SIGNATURE


def test_bookkeeping_keys() -> None:
    ignored = [
        "seed",
        "run_dir",
        "resume",
        "device",
        "hydra.job.name",
        "logging.every",
        "dataset.root",
        "train.ckpt_path",
        "train.num_threads",
        "train.progress",
    ]
    kept = ["algorithm.name", "imwa.k", "imwa.merge", "dataset.seed", "train.lr"]
    assert all(report.is_bookkeeping_key(key) for key in ignored)
    assert not any(report.is_bookkeeping_key(key) for key in kept)


def test_notes_count_each_unfinished_state() -> None:
    def run(state: str, top1: float | None = None) -> report.Run:
        final = None if top1 is None else {"top1": top1}
        return report.Run(path=Path(state), config={"seed": 0}, state=state, final=final)

    runs = [
        run(report.COMPLETE, 0.70),
        run(report.CRASHED, 0.50),
        run(report.STOPPED, 0.60),
        run(report.RUNNING, 0.10),
        run(report.CRASHED),  # died before its first test evaluation: nothing to average
    ]
    group = report.Group(label="all runs", settings={}, runs=runs)
    assert report.summarise(group).notes == "2 crashed, 1 stopped, 1 running excluded"
    summary = report.summarise(group, include_incomplete=True)
    assert summary.notes == "1 crashed, 1 stopped included; 1 crashed, 1 running excluded"
    final_top1 = summary.stats["final_top1"]
    assert final_top1 is not None and final_top1.mean == pytest.approx(60.0)  # 70, 50, 60


def test_sample_std_and_format() -> None:
    two_decimals = "{:.2f}".format
    stat = report.mean_std([70.0, 72.0, 74.0])
    assert stat is not None and report.format_stat(stat, two_decimals, 3) == "72.00 ± 2.00"
    # One value has no spread: no "± 0.00" that reads like a measured zero.
    single = report.mean_std([81.6])
    assert single is not None and single.std is None
    assert report.format_stat(single, two_decimals, 1) == "81.60"
    assert report.format_stat(single, two_decimals, 3) == "81.60 (n=1)"
    assert report.mean_std([]) is None


def test_wall_time_reads_as_hours_minutes_seconds() -> None:
    """Hours with two decimals showed 0.00 for a run of a few minutes."""
    assert report.duration(31.4) == "0:00:31"
    assert report.duration(8 * 60 + 24) == "0:08:24"
    assert report.duration(2 * 86400 + 3661) == "49:01:01"
    stat = report.mean_std([90.0, 150.0])
    assert report.format_stat(stat, report.duration, 2) == "0:02:00 ± 0:00:42"


def test_single_run_group_has_no_spread_in_table_and_csv(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    results = {"status": "complete", "final": {"top1": 0.816, "balanced_acc": 0.5}, "wall_time_s": 95.0,
               "images_per_s": 1234.4}
    (run_dir / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(None):
        assert report.main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    row = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
               if line.startswith("| all runs"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["all runs", "1", "81.60"]
    assert cells[-3:-1] == ["0:01:35", "1234"]
    assert "±" not in row
    csv_row = _csv_rows(tmp_path / "out")["all runs"]
    assert (csv_row["final_top1_mean"], csv_row["final_top1_std"], csv_row["final_top1_n"]) == ("81.6", "", "1")
    assert csv_row["wall_time_s_mean"] == "95.0"


def test_nothing_readable_returns_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    assert f"skipped: {tmp_path / 'missing'}: no such file or directory" in capsys.readouterr().out


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, ssl_imwa.report; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=root).returncode == 0


def test_keys_implied_by_other_keys_are_dropped_from_labels() -> None:
    def run(name: str, threshold: float | None, k: int) -> report.Run:
        config = {"algorithm.name": name, "imwa.k": k, "seed": 0}
        if threshold is not None:
            config["algorithm.threshold"] = threshold
        return report.Run(path=Path(f"/{name}{k}"), config=config, state="complete")

    runs = [run("fixmatch", 0.95, 1), run("fixmatch", 0.95, 2), run("supervised", None, 1)]
    labels = [group.label for group in report.group_runs(runs)]
    assert labels == ["algorithm=fixmatch, K=1", "algorithm=fixmatch, K=2", "algorithm=supervised, K=1"]


def test_keys_that_vary_together_are_all_kept_in_reader_order() -> None:
    """Keys that vary together (imwa.merge with dataset.val_per_class in a TWA arm) are all in the
    label, though either alone makes the same groups: the label says which arm merges with TWA."""

    def run(merge: str, val_per_class: int, lr: float, seed: int) -> report.Run:
        config = {"algorithm.name": "fixmatch", "imwa.k": 2, "imwa.merge": merge,
                  "dataset.val_per_class": val_per_class, "train.lr": lr, "imwa.twa.lr": 0.05, "seed": seed}
        return report.Run(path=Path(f"/{merge}{lr}{seed}"), config=config, state="complete")

    runs = [run("uniform", 0, 0.03, 0), run("twa", 20, 0.03, 0), run("twa", 20, 0.03, 1), run("twa", 20, 0.1, 0)]
    groups = report.group_runs(runs)
    assert [group.label for group in groups] == [
        "merge=twa, val_per_class=20, lr=0.03",
        "merge=twa, val_per_class=20, lr=0.1",
        "merge=uniform, val_per_class=0, lr=0.03",
    ]
    assert [len(group.runs) for group in groups] == [2, 1, 1]
    assert list(groups[0].settings) == ["imwa.merge", "dataset.val_per_class", "train.lr"]


def test_aliases_are_short_and_unambiguous() -> None:
    assert report.aliases(["imwa.k", "imwa.episodes", "train.lr", "imwa.twa.lr", "train.mu"]) == {
        "imwa.k": "K", "imwa.episodes": "E", "train.lr": "lr", "imwa.twa.lr": "twa.lr", "train.mu": "mu"}
    # two keys that would shorten to the same name keep their full names
    assert report.aliases(["train.momentum", "imwa.momentum"]) == {
        "train.momentum": "train.momentum", "imwa.momentum": "imwa.momentum"}


def test_report_explains_the_short_names(default_report: tuple[Path, str]) -> None:
    _, printed = default_report
    assert "Group labels use short names: K = imwa.k, E = imwa.episodes." in printed


def _long_label_sweep(groups: int = 10) -> list[report.GroupSummary]:
    """`groups` groups whose labels run to 100+ characters, as a real ablation grid's do."""
    runs = []
    for index in range(groups):
        k = (1, 2, 4)[index % 3]
        config = {
            "algorithm.name": ("fixmatch", "acr")[index % 2],
            "imwa.k": k,
            "imwa.episodes": 4 if k > 1 else 1,
            "imwa.merge": ("uniform", "twa")[2 * index // groups],
            "dataset.val_per_class": (0, 20)[2 * index // groups],
            "train.unlabeled_loss_warmup_iterations": 1000 * index,
            "model.widths": f"[{32 + index},64,128,256]",
            "seed": 0,
        }
        top1 = 0.3 + 0.02 * index
        curve = [{"step": step, "balanced_acc": top1 * step / 400, "top1": top1} for step in (100, 200, 300, 400)]
        episodes = [{"episode": episode, "balanced_acc": top1 - 0.01 * (4 - episode)} for episode in range(1, 5)]
        final = {"top1": top1, "per_class": [0.9, 0.6, 0.3, 0.1]}
        runs.append(report.Run(path=Path(f"/sweep/{index}"), config=config, state="complete", final=final,
                               curve=curve, episodes=episodes if k > 1 else []))
    return [report.summarise(group) for group in report.group_runs(runs)]


@pytest.mark.parametrize("groups", [10, 14])   # 14: the study's table, one group per algorithm
def test_plots_with_many_long_labels_keep_their_axes_and_legend_in_the_figure(tmp_path: Path, groups: int) -> None:
    """Long labels must not push the legend off the image or shrink the axes to a sliver
    (matplotlib: "constrained_layout not applied because axes sizes collapsed to zero"), and every
    group's line must be told apart from every other's (past the ten colours, by its line style)."""
    from ssl_imwa.report.plots import curves_figure, episodes_figure, per_class_figure

    summaries = _long_label_sweep(groups)
    labels = [summary.label for summary in summaries]
    assert len(labels) == groups and min(map(len, labels)) > 100
    per_class = [(s.label, np.asarray(s.included[0].final["per_class"]) * 100) for s in summaries[:6]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any layout warning fails the test
        figures = {
            "curves": (curves_figure(summaries, "balanced_acc"), labels),
            "episodes": (episodes_figure(summaries, "balanced_acc"),
                         [s.label for s in summaries if "K=1" not in s.label]),
            "per_class": (per_class_figure(summaries, per_class), labels[:6]),
        }
        for name, (figure, shown) in figures.items():
            assert figure is not None, name
            figure.savefig(io.BytesIO(), format="png")  # runs the layout
            width, height = figure.get_size_inches()
            axes = figure.axes[0]
            box = axes.get_position()
            assert box.width * width > 5.0 and box.height * height > 2.4, (name, box)
            renderer = figure.canvas.get_renderer()
            tight = figure.get_tightbbox(renderer)  # inches: everything drawn must lie on the image
            assert tight.x0 >= -0.01 and tight.y0 >= -0.01, (name, tight)
            assert tight.x1 <= width + 0.01 and tight.y1 <= height + 0.01, (name, tight, width, height)
            legend = figure.legends[0]
            assert legend.get_window_extent(renderer).y1 <= axes.get_tightbbox(renderer).y0, name  # below
            assert [text.get_text().replace("\n", " ") for text in legend.get_texts()] == shown, name
            assert axes.get_title(), name
            if name != "per_class":
                looks = [(line.get_color(), line.get_linestyle()) for line in axes.get_lines() if line.get_label() in shown
                         or not line.get_label().startswith("_")]
                assert len(set(looks)) == len(looks) == len(shown), (name, looks)
    for plot, filename in ((report.plot_curves, "curves.png"), (report.plot_episodes, "episodes.png")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            note = plot(summaries, "balanced_acc", tmp_path / filename)
        assert note.startswith(f"{filename}: ")
        image = matplotlib.image.imread(tmp_path / filename)
        assert image.shape[1] == 700 and image.shape[0] > 450  # 7 in wide; taller for the legend


def _snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every path under `directory` with its bytes (or a link's target, or 'dir')."""
    snapshot: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        snapshot[key] = os.readlink(path) if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return snapshot


@pytest.mark.parametrize("where", ["run", "inside", "sweep"])
def test_an_out_that_is_inside_or_holds_a_run_is_refused_by_name(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report never writes into a run: `--out RUN --tensorboard` would replace the run's own
    tensorboard/ (its event files) with a view holding a link to itself."""
    sweep = tmp_path / "multirun"
    run_dir = _write_run(sweep, "imwa.k=1,seed=0", 1, 0, {"status": "complete"}, _results(0.7, 0.6, None),
                         [json.dumps(e) for e in _evaluations(1, 0.7)])
    for stream in ("replica0", "merged", "hparams"):
        (run_dir / "tensorboard" / stream).mkdir(parents=True)
        (run_dir / "tensorboard" / stream / "events.out.tfevents.1.host").write_bytes(stream.encode() * 3)
    before = _snapshot(tmp_path)
    out = {"run": run_dir, "inside": run_dir / "report", "sweep": sweep}[where]
    assert report.main([str(run_dir), "--out", str(out), "--tensorboard"]) == 1
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out} ")
    assert f"run directory {run_dir}" in lines[0]
    # next to the run (not in it) the report and its view are written as before
    assert report.main([str(run_dir), "--out", str(tmp_path / "report"), "--tensorboard"]) == 0
    assert {key: value for key, value in _snapshot(tmp_path).items() if not key.startswith("report")} == before


def test_a_group_with_one_evaluation_is_drawn_and_named(tmp_path: Path) -> None:
    """curves.png drew lines without markers: a group with a single evaluation was invisible (an
    empty chart with only a legend) and the report did not say why."""
    from matplotlib.colors import to_rgb

    from ssl_imwa.report.plots import curves_figure

    done = {"status": "complete"}
    one = [json.dumps({**e, "step": 100}) for e in _evaluations(1, 0.7)[:1]]  # one test evaluation
    _write_run(tmp_path / "sweep", "imwa.k=1,seed=0", 1, 0, done, _results(0.7, 0.6, None), one)
    _write_run(tmp_path / "sweep", "imwa.k=2,seed=0", 2, 0, done, _results(0.8, 0.7, None),
               [json.dumps(e) for e in _evaluations(2, 0.8)])
    with contextlib.redirect_stdout(None):
        assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    curves_line = next(line for line in text.splitlines() if line.startswith("- curves.png: "))
    assert f"only one test evaluation (a single marker, no line): {K1}" in curves_line
    assert K2 not in curves_line  # four evaluations: a line
    summaries = [report.summarise(group) for group in report.group_runs(
        [report.load_run(path) for path in report.discover([str(tmp_path / "sweep")])[0]])]
    figure = curves_figure(summaries, "balanced_acc")
    assert figure is not None
    figure.canvas.draw()
    axes = figure.axes[0]
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float) / 255
    box = axes.get_window_extent()
    height = pixels.shape[0]
    inside = pixels[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    k1_color = np.asarray(to_rgb(axes.lines[[line.get_label() for line in axes.lines].index(K1)].get_color()))
    assert (np.abs(inside - k1_color).max(axis=-1) < 0.05).sum() >= 10  # the K=1 point shows in the axes


DOCS_ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_show_the_configs_exclude_keys_and_every_preset() -> None:
    """docs/sweeps_and_reports.md showed 4 of config.yaml's 10 exclude_keys; the README's table of
    presets lacked cpu_digits_lt."""
    config = yaml.safe_load((DOCS_ROOT / "configs" / "config.yaml").read_text())
    keys = config["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    page = (DOCS_ROOT / "docs" / "sweeps_and_reports.md").read_text()
    shown = yaml.safe_load(page.split("`configs/config.yaml` sets\n\n```yaml\n", 1)[1].split("```", 1)[0])
    assert shown["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"] == keys
    row = next(line for line in (DOCS_ROOT / "README.md").read_text().splitlines() if line.startswith("| `experiment=`"))
    listed = set(row.split("|")[2].replace("`", "").replace(" ", "").split(","))
    assert listed == {path.stem for path in (DOCS_ROOT / "configs" / "experiment").glob("*.yaml")}
