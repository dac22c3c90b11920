"""Evaluate a saved checkpoint again, with any head, model or split: the diagnosis after a run.

    python -m ssl_imwa.evaluate RUN_DIR [--checkpoint latest] [--head all] [--model teacher] [--split test]

Rebuilds data, model and heads from the run directory's config.yaml, loads the checkpoint
(validated against that config, as a resume is) and prints the metrics the run logs. With the
run's own head, teacher and split it reproduces the run's last logged evaluation exactly;
`--head all` adds the heads the run did not evaluate (ACR's standard head beside its balanced
one), `--model student` the student instead of the EMA teacher.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ssl_imwa.algorithm import Algorithm
from ssl_imwa.builders import (
    build_algorithm,
    build_evaluator,
    build_initial_model,
    configure_torch,
)
from ssl_imwa.checkpoint import load_checkpoint
from ssl_imwa.checkpoint_store import fingerprint
from ssl_imwa.config import Config, register_configs, validate
from ssl_imwa.data import SSLData, build_data
from ssl_imwa.keys import SUMMARY_METRICS

# Table headers: the first column is the model head (`--head`), so the head/medium/tail class
# groups get their own names rather than a second column called `head`.
HEADERS = ("top1", "balanced_acc", "macro_f1", "head classes", "medium classes", "tail classes")


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """`latest`, `best`, `merge_004` or a file name, under RUN_DIR/checkpoints; an error lists what exists."""
    directory = run_dir / "checkpoints"
    path = directory / (name if name.endswith(".pt") else f"{name}.pt")
    if not path.is_file():
        found = sorted(p.name for p in directory.glob("*.pt")) if directory.is_dir() else []
        raise FileNotFoundError(f"checkpoint {path} does not exist; {directory} holds {found or 'no checkpoints'}")
    return path


@dataclass
class SavedRun:
    """A run directory rebuilt as the run built it: config, data, algorithm and one checkpoint's payload.

    Shared by `evaluate_checkpoint` and the Python API's `load_run`, so both rebuild models one way.
    """

    cfg: Config
    data: SSLData
    algorithm_cls: type[Algorithm]
    algorithm: Algorithm
    payload: dict[str, Any]
    device: torch.device

    def network(self, replica: int, model: str) -> torch.nn.Module:
        """Replica `replica`'s EMA teacher (`model="teacher"`) or student weights, in eval mode."""
        network = build_initial_model(self.cfg, self.data, self.algorithm, self.device)
        network.load_state_dict(self.payload["replicas"][replica]["teacher" if model == "teacher" else "model"])
        return network.eval()


def read_run_config(run_dir: Path, device: str | None = None) -> Config:
    """The run's validated config.yaml; `device` (e.g. cpu) replaces the device it trained on."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: {run_dir} is not a run directory")
    register_configs()
    cfg = validate(OmegaConf.load(config_file))
    if device is not None:
        cfg.device = device
    return cfg


def open_run(run_dir: Path, cfg: Config, checkpoint: str, device: torch.device) -> SavedRun:
    """Load `checkpoint` (validated against `cfg`, as a resume is) and rebuild the run's data and algorithm."""
    payload = load_checkpoint(checkpoint_path(run_dir, checkpoint), fingerprint(cfg))
    data = build_data(cfg.dataset)
    algorithm = build_algorithm(cfg, data, device)
    return SavedRun(cfg, data, type(algorithm), algorithm, payload, device)


def evaluate_checkpoint(run_dir: Path, checkpoint: str = "latest", heads: Sequence[str] | None = None,
                        model: str = "teacher", split: str = "test", replica: int = 0,
                        device: str | None = None) -> dict[str, dict[str, Any]]:
    """Metrics of each requested head (default: the algorithm's evaluation head), by head name."""
    if model not in ("teacher", "student"):
        raise ValueError(f"--model must be 'teacher' or 'student', got {model!r}")
    if split not in ("test", "val"):
        raise ValueError(f"--split must be 'test' or 'val', got {split!r}")
    cfg = read_run_config(run_dir, device)
    saved = open_run(run_dir, cfg, checkpoint, configure_torch(cfg))
    replicas = len(saved.payload["replicas"])
    if not 0 <= replica < replicas:
        raise ValueError(f"--replica {replica}: the checkpoint holds {replicas} replica(s) on this "
                         f"process (0..{replicas - 1})")
    network = saved.network(replica, model)
    available = list(network.heads)
    eval_head = saved.algorithm_cls.eval_head
    chosen = [eval_head] if not heads else (available if list(heads) == ["all"] else list(heads))
    unknown = [head for head in chosen if head not in available]
    if unknown:
        raise ValueError(f"--head {unknown}: this {cfg.algorithm.name} model has heads {available} (or 'all')")
    if split == "val" and saved.data.val_images is None:
        raise ValueError(f"--split val: run {run_dir} has no validation split (dataset.val_per_class is 0)")
    evaluator = build_evaluator(cfg, saved.data, eval_head, saved.device, saved.algorithm_cls.eval_logit_offset)
    return evaluator.evaluate_heads(network, split, chosen)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest", help="latest, best, merge_NNN or a file in checkpoints/")
    parser.add_argument("--head", action="append", dest="heads",
                        help="head to evaluate (repeatable; 'all' for every head); default: the algorithm's")
    parser.add_argument("--model", default="teacher", choices=("teacher", "student"))
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--replica", type=int, default=0, help="replica index within the checkpoint")
    parser.add_argument("--device", default=None, help="override the run's device (e.g. cpu)")
    parser.add_argument("--json", action="store_true", help="print every metric (per-class, confusion) as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate_checkpoint(args.run_dir, args.checkpoint, args.heads, args.model, args.split, args.replica,
                                  args.device)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"# {args.run_dir} | checkpoint {args.checkpoint} | {args.model} | replica {args.replica} | "
          f"{args.split} split (percent)")
    print(format_table(results))
    return 0


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per model head, metrics in percent."""
    lines = ["| model head | " + " | ".join(HEADERS) + " |", "|---|" + "---|" * len(HEADERS)]
    for head, metrics in results.items():
        lines.append(f"| {head} | " + " | ".join(f"{100 * metrics[key]:.2f}" for key in SUMMARY_METRICS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
