"""The smoke check's harness: its record (sections, checks, figures), the run context, the section runner
that rewrites smoke.json and summary.md after each section, and the replicas it measures.

The replicas are built by the engine's own builders (ssl_imwa.builders) from a real composed
config, over random 32x32 RGB images shaped as a run's data: what the syncs and memory sections
measure is what a run trains.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench._common import compose_config, device_summary, synchronize

LABELED_COUNTS = [500, 300, 180, 110, 65, 40, 24, 14, 8, 5]  # a long tail over 10 classes
ALGORITHMS = ("fixmatch", "daso", "acr")
SPEED_CONFIGS = (  # name, train_step.py arguments, TF32
    ("fp32", [], False),
    ("tf32", [], True),
    ("bf16", ["--precision", "bf16"], False),
    ("bf16_channels_last", ["--precision", "bf16", "--channels-last"], False),
)
TAIL_CHARS = 3000


# ----- the record ---------------------------------------------------------------------------------
@dataclass
class Section:
    key: str
    title: str
    optional: bool
    status: str = "pending"     # passed | failed | error | skipped
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def figure(self, name: str, value: Any) -> Any:
        self.figures[name] = value
        return value

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks[name] = {"passed": bool(passed), "detail": detail}
        print(f"  [{'PASS' if passed else 'FAIL'}] {self.key}.{name}{': ' + detail if detail else ''}", flush=True)
        return bool(passed)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "optional": self.optional, "status": self.status,
                "seconds": round(self.seconds, 2), "figures": self.figures, "checks": self.checks,
                "notes": self.notes, "error": self.error}


def traceback_tail(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text[-TAIL_CHARS:]


@dataclass
class Context:
    """What every section needs: the device, the sizes for this mode, the clock and the output folders."""

    args: argparse.Namespace
    device: torch.device
    out: Path
    work: Path
    started: float = field(default_factory=time.monotonic)
    device_name: str = ""

    def __post_init__(self) -> None:
        self.device_name = device_summary(self.device)  # once: a broken GPU later must not break the record

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed() if self.args.budget_s > 0 else math.inf

    # sizes: the published recipe on the GPU, a few images on --quick
    @property
    def model(self) -> str:
        return "small_cnn" if self.quick else "wrn28_2"

    @property
    def batch(self) -> int:
        return 8 if self.quick else 64

    @property
    def mu(self) -> int:
        return 2 if self.quick else 7


class Smoke:
    """Runs sections in order, records them, and rewrites smoke.json and summary.md after each one
    (`render` turns the payload into summary.md: bench/gpu_smoke/report.py)."""

    def __init__(self, ctx: Context, render: Callable[[dict[str, Any]], str]) -> None:
        self.ctx = ctx
        self.render = render
        self.sections: dict[str, Section] = {}

    def run(self, key: str, title: str, body: Callable[[Section, Context], None], optional: bool,
            needs_s: float = 0.0) -> Section:
        section = self.sections[key] = Section(key, title, optional)
        print(f"\n== {title}", flush=True)
        if optional and self.ctx.remaining() < needs_s:
            section.status = "skipped"
            section.note(f"skipped: {self.ctx.remaining():.0f} s of the {self.ctx.args.budget_s:.0f} s budget left, "
                         f"this section needs about {needs_s:.0f} s")
            self.write()
            return section
        started = time.monotonic()
        try:
            body(section, self.ctx)
        except Exception as error:  # noqa: BLE001  (recorded; the next section still runs)
            section.error = traceback_tail(error)
            print(section.error, flush=True)
        section.seconds = time.monotonic() - started
        failed = [name for name, check in section.checks.items() if not check["passed"]]
        section.status = "error" if section.error else ("failed" if failed else "passed")
        print(f"-- {section.status} in {section.seconds:.1f} s", flush=True)
        self.write()
        return section

    def failed_checks(self) -> list[str]:
        return [f"{key}.{name}" for key, section in self.sections.items()
                for name, check in section.checks.items() if not check["passed"]]

    def errors(self) -> list[str]:
        return [key for key, section in self.sections.items() if section.error]

    def passed(self) -> bool:
        return not self.failed_checks() and not self.errors()

    def payload(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "device": str(ctx.device), "device_name": ctx.device_name, "quick": ctx.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - ctx.elapsed())),
            "wall_s": round(ctx.elapsed(), 1), "budget_s": ctx.args.budget_s,
            "passed": self.passed(), "failed_checks": self.failed_checks(), "errors": self.errors(),
            "checks_total": sum(len(section.checks) for section in self.sections.values()),
            "sections": {key: section.as_dict() for key, section in self.sections.items()},
        }

    def write(self) -> str:
        payload = self.payload()
        _write_atomic(self.ctx.out / "smoke.json", json.dumps(payload, indent=2, default=str) + "\n")
        summary = self.render(payload)
        _write_atomic(self.ctx.out / "summary.md", summary)
        return summary


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ----- what the sections measure --------------------------------------------------------------------
def random_pool(labeled: int, unlabeled: int, seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    """Random 32x32 RGB uint8 images with a labeled part, and unlabeled targets partly unknown (-1)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "labeled_images": torch.randint(0, 256, (labeled, 3, size, size), dtype=torch.uint8, generator=generator),
        "labeled_targets": torch.randint(0, 10, (labeled,), generator=generator),
        "unlabeled_images": torch.randint(0, 256, (unlabeled, 3, size, size), dtype=torch.uint8, generator=generator),
        "unlabeled_targets": torch.randint(-1, 10, (unlabeled,), generator=generator),
        "unlabeled_is_labeled": torch.rand(unlabeled, generator=generator) < 0.2,
    }


def make_stream(pool: dict[str, torch.Tensor], device: torch.device, batch: int, mu: int, num_strong: int,
                seed: int = 0, replica: int = 0, num_labeled_strong: int = 0, balanced: str | None = None) -> Any:
    """A TrainStream over `pool` with CIFAR-10's normalisation and augmentation."""
    from ssl_imwa.data import TrainStream

    return TrainStream(**pool, batch_size=batch, mu=mu, num_strong=num_strong, mean=[0.4914, 0.4822, 0.4465],
                       std=[0.2471, 0.2435, 0.2616], pad=4, hflip=True, cutout=16, seed=seed, replica=replica,
                       episode=0, device=device, num_labeled_strong=num_labeled_strong, balanced=balanced)


class RandomData:
    """Random images in the shape of a run's data (ssl_imwa.data.SSLData), as far as the builders read it:
    10 classes with a long-tailed labeled prior, 3 channels, and streams that share one copy of the
    images per device, as a run's replicas do."""

    num_classes = 10
    in_channels = 3

    def __init__(self, batch: int, mu: int) -> None:
        self.pool = random_pool(max(64, batch), max(256, 2 * mu * batch))
        self.counts = {"labeled": LABELED_COUNTS}
        self.unlabeled_images = self.pool["unlabeled_images"]
        self._resident: dict[torch.device, dict[str, torch.Tensor]] = {}

    def make_stream(self, batch_size: int, mu: int, num_strong: int, seed: int, replica: int = 0, episode: int = 0,
                    device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1),
                    num_labeled_strong: int = 0, balanced: str | None = None) -> Any:
        device = torch.device(device)
        if device not in self._resident:
            self._resident[device] = {key: value.to(device) for key, value in self.pool.items()}
        return make_stream(self._resident[device], device, batch_size, mu, num_strong, seed, replica,
                           num_labeled_strong, balanced)


# Each algorithm where a check wants it: DASO past its warm-up within the check's warm-up steps, ACR
# estimating from step 0 with an epoch longer than the whole check (its one epoch start, a
# once-per-500-steps event in a real run, falls in the warm-up).
ALGORITHM_OVERRIDES = {
    "fixmatch": lambda warmup: [],
    "daso": lambda warmup: [f"algorithm.warmup_steps={max(1, warmup // 2)}", "algorithm.dist_update_period=4"],
    "acr": lambda warmup: ["algorithm.epoch_length=100000", "algorithm.estimate_start_epoch=0"],
}


def smoke_config(algorithm: str, model: str, batch: int, mu: int, warmup: int = 1) -> Any:
    """The validated config of a run of `algorithm` on `model` at batch size `batch` and ratio `mu`, fp32."""
    from ssl_imwa.config import validate

    return validate(compose_config([f"algorithm={algorithm}", f"model={model}", f"train.batch_size={batch}",
                                    f"train.mu={mu}", "train.iterations=10000", "train.precision=fp32",
                                    *ALGORITHM_OVERRIDES[algorithm](warmup)]))


def build_replicas(cfg: Any, data: RandomData, device: torch.device, count: int = 1) -> tuple[list[Any], Any]:
    """`count` replicas of a run of `cfg` on `device` (each with its own algorithm instance, all from one
    initial model, as ssl_imwa.builders.build_replicas makes them), and the run's Trainer."""
    from ssl_imwa.builders import build_algorithm, build_initial_model, build_replica
    from ssl_imwa.trainer import Trainer

    algorithms = [build_algorithm(cfg, data, device) for _ in range(count)]
    initial_model = build_initial_model(cfg, data, algorithms[0], device)
    replicas = [build_replica(index, cfg, data, algorithm, initial_model, device)
                for index, algorithm in enumerate(algorithms)]
    return replicas, Trainer(cfg.train, device)


def release(device: torch.device) -> None:
    """Free what the last measurement left (a broken device is reported by the next measurement, not here)."""
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            synchronize(device)
            torch.cuda.empty_cache()
