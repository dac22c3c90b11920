"""One command that checks the project on a real GPU, and runs end to end on the CPU in CI.

    python -m bench.gpu_smoke --out DIR [--device cuda|cpu] [--quick] [--budget-s 480] [--work DIR]

Writes DIR/smoke.json (every figure and every check with pass/fail, rewritten after each section
so a killed run keeps what it measured) and DIR/summary.md (Markdown, ready to paste into
docs/performance.md), prints the summary, and exits 1 if any check failed or a section broke
(0 otherwise). Sections, each in its own try/except (a failure is recorded with its traceback's
tail and the next section runs):

1. versions: torch, CUDA, cuDNN, the GPUs, Python, the CPU, hydra-core and omegaconf;
2. stream parity: `ssl_imwa.data.TrainStream` with one seed on the CPU and on the device gives bitwise
   the same batches (every key, mu > 0, 1 and 2 strong views; on --device cpu: CPU against CPU);
3. syncs: steady-state `Trainer.step`s of FixMatch, DASO (past its warm-up) and ACR (estimating)
   under `torch.cuda.set_sync_debug_mode("warn")`, warnings counted per step and per source line;
   on cpu the same steps on the `meta` device under `ssl_imwa.sync_audit.SyncAudit`. Passes when a
   step makes no sync;
4. speed: images/s of a FixMatch step in fp32, TF32, bf16 and bf16 + channels_last against the
   bare model's forward + backward and the data stream alone, with peak memory per configuration;
5. memory of K = 1, 2, 4 time-sliced replicas of WRN-28-8 resident on one device;
6. end to end through `python main.py` (Hydra): exact resume mid-episode (fp16, K=2, E=2),
   DASO and ACR in bf16, a TWA merge, and with two or more GPUs the same resume under torchrun.

A time budget (--budget-s, 480 s by default on cuda) skips the optional sections (3-6) and the
end-to-end runs that no longer fit, with a note, rather than overrunning; every subprocess gets a
timeout inside it. Section 6 runs two trainings at once (--jobs); --torchrun forces its torchrun
check with fewer than two GPUs (gloo on the CPU; two ranks on one GPU). --quick shrinks everything
(small CNN, B=8, mu=2, a few steps); `--device cpu --quick` (about 45 s on two busy cores, where
only the uninterrupted run of section 6 goes through main.py and the others run in this process)
is what tests/test_gpu_smoke.py runs.

On the lent GPU machine (one H100, Python 3.12, its own torch; hydra-core and omegaconf are not
installed there and nothing can be downloaded there, so they travel as wheels):

  1. here, once:  bash bench/gpu_check.sh --fetch-wheels
     (pip-downloads hydra-core and omegaconf and builds antlr4-python3-runtime 4.9.3, which PyPI
     ships only as an sdist, into .whl/, which it adds to .git/info/exclude);
  2. the device tool's `run`, with carry [".whl"] and timeout_s 600:
         bash bench/gpu_check.sh
     It installs the wheels into /tmp/site (pip --no-index --target), runs this script with
     --device cuda --out $OUT --work /tmp/gpu_smoke_runs, and returns smoke.json, summary.md,
     log.txt and nvidia-smi.txt (the run directories stay on the machine: $OUT takes 8 files).
     Extra arguments are passed on (`bash bench/gpu_check.sh --quick` for a one-minute check).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    ROOT,
    checkpoint_tensors,
    compose_config,
    cpu_name,
    device_summary,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
    tensor_differences,
)
from ssl_imwa.algorithm import AlgorithmContext
from ssl_imwa.sync_audit import SyncAudit, repository_frame

THIS_FILE = Path(__file__).resolve()
LABELED_COUNTS = [500, 300, 180, 110, 65, 40, 24, 14, 8, 5]  # a long tail over 10 classes
UNLABELED_SIZE = 8 * sum(LABELED_COUNTS)  # told to the algorithms; the built-ins do not use it
ALGORITHMS = ("fixmatch", "daso", "acr")
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
    """Runs sections in order, records them, and rewrites smoke.json and summary.md after each one."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
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
        summary = render_summary(payload)
        _write_atomic(self.ctx.out / "summary.md", summary)
        return summary


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ----- shared builders ----------------------------------------------------------------------------
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
                seed: int = 0) -> Any:
    from ssl_imwa.data import TrainStream

    return TrainStream(**pool, batch_size=batch, mu=mu, num_strong=num_strong, mean=[0.4914, 0.4822, 0.4465],
                       std=[0.2471, 0.2435, 0.2616], pad=4, hflip=True, cutout=16, seed=seed, replica=0,
                       episode=0, device=device)


def build_algorithm(name: str, total_steps: int, warmup: int, device: torch.device) -> Any:
    """FixMatch; DASO whose warm-up ends before `warmup` steps are done; ACR estimating from step 0.

    ACR's epoch is longer than the whole check, so its one epoch start (a once-per-500-steps event in
    a real run) falls in the warm-up.
    """
    context = AlgorithmContext(LABELED_COUNTS, total_steps, num_unlabeled=UNLABELED_SIZE, device=device)
    if name == "fixmatch":
        from ssl_imwa.algorithms.fixmatch import FixMatch, FixMatchConfig

        return FixMatch(FixMatchConfig(), context)
    if name == "daso":
        from ssl_imwa.algorithms.daso import DASO, DASOConfig

        return DASO(DASOConfig(warmup_steps=max(1, warmup // 2), dist_update_period=4), context)
    if name == "acr":
        from ssl_imwa.algorithms.acr import ACR, ACRConfig

        return ACR(ACRConfig(epoch_length=100_000, estimate_start_epoch=0), context)
    raise ValueError(name)


def build_replica(algorithm: Any, model_name: str, batch: int, mu: int, device: torch.device, index: int = 0,
                  precision: str = "fp32", channels_last: bool = False, pool: dict[str, torch.Tensor] | None = None
                  ) -> tuple[Any, Any]:
    """A replica as ssl_imwa.run builds one (model with the algorithm's heads, EMA teacher, SGD, own
    stream on the device), and a Trainer for it."""
    from ssl_imwa.config import TrainConfig
    from ssl_imwa.ema import EMATeacher
    from ssl_imwa.models import create_model
    from ssl_imwa.trainer import Replica, Trainer, build_optimizer

    model = create_model(model_name, 10, 3, 0.001)
    for head_name, head in algorithm.build_heads(model.feature_dim, 10).items():
        model.add_head(head_name, head)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = TrainConfig(iterations=algorithm.total_steps, batch_size=batch, mu=mu, precision=precision,
                      channels_last=channels_last, progress=False)
    pool = pool if pool is not None else random_pool(max(64, batch), max(256, 2 * mu * batch))
    stream = make_stream(pool, device, batch, mu, algorithm.num_strong_views(), seed=index)
    replica = Replica(index, model, EMATeacher(model, algorithm.cfg.ema), build_optimizer(model, cfg), algorithm,
                      stream, None)
    return replica, Trainer(cfg, device)


def release(device: torch.device) -> None:
    """Free what the last measurement left (a broken device is reported by the next measurement, not here)."""
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            synchronize(device)
            torch.cuda.empty_cache()


# ----- 1. versions --------------------------------------------------------------------------------
def section_versions(sec: Section, ctx: Context) -> None:
    sec.figure("python", platform.python_version())
    sec.figure("platform", platform.platform())
    sec.figure("cpu", cpu_name())
    sec.figure("cpu_count", os.cpu_count())
    sec.figure("torch", torch.__version__)
    sec.figure("cuda", torch.version.cuda)
    sec.figure("cuda_available", torch.cuda.is_available())
    sec.figure("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        sec.figure("tf32_defaults", {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                     "cudnn": torch.backends.cudnn.allow_tf32})
    except RuntimeError as error:  # newer torch refuses the legacy flags once the new API was used
        sec.figure("tf32_defaults", {"error": str(error)[:200]})
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                         "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count})
    sec.figure("gpus", gpus)
    for module in ("numpy", "torchvision", "hydra", "omegaconf", "sklearn"):
        try:
            sec.figure(module, __import__(module).__version__)
        except Exception as error:  # noqa: BLE001  (a missing package is a finding, not a crash)
            sec.figure(module, f"unavailable: {type(error).__name__}: {error}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    sec.figure("git_commit", commit or "unknown (no git checkout)")
    sec.figure("device", str(ctx.device))
    sec.figure("device_name", device_summary(ctx.device))
    sec.check("hydra_and_omegaconf_import", not str(sec.figures["hydra"]).startswith("unavailable")
              and not str(sec.figures["omegaconf"]).startswith("unavailable"),
              f"hydra {sec.figures['hydra']}, omegaconf {sec.figures['omegaconf']}")
    if ctx.cuda:
        sec.check("cuda_available", torch.cuda.is_available(),
                  f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "torch sees no GPU")


# ----- 2. stream parity ---------------------------------------------------------------------------
def _batch_items(batch: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in batch.items():
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                yield f"{key}[{index}]", item
        else:
            yield key, value


def _difference(reference: torch.Tensor, candidate: torch.Tensor) -> str | None:
    candidate = candidate.cpu()
    if reference.shape != candidate.shape or reference.dtype != candidate.dtype:
        return f"{tuple(reference.shape)} {reference.dtype} vs {tuple(candidate.shape)} {candidate.dtype}"
    if torch.equal(reference, candidate):
        return None
    differing = int((reference != candidate).sum())
    spread = (reference.double() - candidate.double()).abs().max()
    return f"{differing} of {reference.numel()} elements differ (max |diff| {float(spread):.3g})"


def section_stream_parity(sec: Section, ctx: Context) -> None:
    steps = 3
    batch, mu = (8, 2) if ctx.quick else (32, 7)
    pool = random_pool(96, 512)
    sec.figure("setup", {"steps": steps, "batch": batch, "mu": mu, "images": "32x32 RGB uint8, random",
                         "reference": "cpu", "candidate": str(ctx.device)})
    if not ctx.cuda:
        sec.note("--device cpu: the CPU stream is compared with a second CPU stream (checks the code path only)")
    for num_strong in (1, 2):
        reference = make_stream(pool, torch.device("cpu"), batch, mu, num_strong)
        candidate = make_stream(pool, ctx.device, batch, mu, num_strong)
        mismatches: list[str] = []
        off_device: set[str] = set()
        keys: list[str] = []
        for step in range(steps):
            expected = dict(_batch_items(next(reference)))
            actual = dict(_batch_items(next(candidate)))
            keys = sorted(expected)
            if expected.keys() != actual.keys():
                mismatches.append(f"step {step}: keys {sorted(expected)} vs {sorted(actual)}")
                continue
            for key in keys:
                if actual[key].device.type != ctx.device.type:
                    off_device.add(f"{key} on {actual[key].device}")
                difference = _difference(expected[key], actual[key])
                if difference:
                    mismatches.append(f"step {step} {key}: {difference}")
        label = f"strong{num_strong}"
        sec.figure(f"{label}_keys", keys)
        sec.figure(f"{label}_mismatches", mismatches)
        sec.check(f"bitwise_{label}", not mismatches,
                  "; ".join(mismatches[:4]) or f"{steps} batches, keys {', '.join(keys)}: bitwise equal")
        sec.check(f"on_device_{label}", not off_device,
                  ", ".join(sorted(off_device)) or f"every tensor of the batch on {ctx.device.type}")


# ----- 3. syncs -----------------------------------------------------------------------------------
def _short_path(filename: str) -> str:
    path = Path(filename)
    with contextlib.suppress(ValueError, OSError):
        return str(path.resolve().relative_to(ROOT))
    parts = path.parts
    if "torch" in parts:
        return "/".join(parts[parts.index("torch"):])
    return filename


def measured_steps(first: int, count: int, log_every: int) -> list[int]:
    """`count` global steps from `first`, leaving out those after which the orchestrator converts the
    outputs for logging (done % log_every == 0): those syncs are by design."""
    steps: list[int] = []
    step = first
    while len(steps) < count:
        if (step + 1) % log_every:
            steps.append(step)
        step += 1
    return steps


def _sync_warnings(steps: list[int], run_step: Callable[[int], Any]) -> tuple[list[int], Counter, Counter, Counter]:
    """Run the steps under torch.cuda.set_sync_debug_mode('warn'); count the warnings per step and by source."""
    per_step = {step: 0 for step in steps}
    by_line: Counter[str] = Counter()
    by_repository_frame: Counter[str] = Counter()
    others: Counter[str] = Counter()
    current = [steps[0]]

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message)
        if "synchroniz" not in text:
            others[f"{category.__name__}: {text.splitlines()[0][:160]}"] += 1
            return
        per_step[current[0]] += 1
        by_line[f"{_short_path(filename)}:{lineno}"] += 1
        by_repository_frame[repository_frame(traceback.extract_stack(), skip=(THIS_FILE,))] += 1

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        warnings.showwarning = record  # called where the warning is raised: the stack is still there
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in steps:
                current[0] = step
                run_step(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [per_step[step] for step in steps], by_line, by_repository_frame, others


def _audit_steps(device: torch.device, steps: list[int], run_step: Callable[[int], Any],
                 tolerate: bool) -> dict[str, Any]:
    """Each step under its own SyncAudit: syncs and host-to-device copies per step, sources summed."""
    syncs, copies, blocking, copied = [], [], [], []
    sources: Counter[str] = Counter()
    copy_sources: Counter[str] = Counter()
    for step in steps:
        with SyncAudit(device, tolerate=tolerate) as audit:
            run_step(step)
        syncs.append(len(audit.syncs))
        copies.append(len(audit.copies_to_device))
        blocking.append(sum(not copy.non_blocking for copy in audit.copies_to_device))
        copied.append(sum(copy.nbytes for copy in audit.copies_to_device))
        sources.update(audit.sync_lines())
        copy_sources.update(copy.where for copy in audit.copies_to_device)
    return {"syncs_per_step_list": syncs, "copies_per_step_list": copies, "blocking_copies_per_step_list": blocking,
            "copied_bytes_per_step_list": copied, "sync_sources": dict(sources.most_common()),
            "copy_sources": dict(copy_sources.most_common())}


def section_syncs(sec: Section, ctx: Context) -> None:
    from ssl_imwa.config import TrainConfig

    log_every = TrainConfig().log_every
    if ctx.cuda:
        warmup, count, device = 5, 10, ctx.device
        model, batch, mu = ctx.model, ctx.batch, ctx.mu
        method = "torch.cuda.set_sync_debug_mode('warn') on the GPU; copies from SyncAudit on further steps"
    else:
        warmup, count, device = 1, (2 if ctx.quick else 10), torch.device("meta")
        model, batch, mu = "small_cnn", ctx.batch, ctx.mu
        method = "SyncAudit(tolerate=True) on the meta device (a stand-in: the CPU never waits)"
    steps = measured_steps(warmup, count, log_every)
    sec.figure("setup", {"method": method, "model": model, "batch": batch, "mu": mu, "precision": "fp32",
                         "warmup_steps": warmup, "measured_steps": steps, "log_every": log_every,
                         "daso_warmup_steps": max(1, warmup // 2), "acr": "estimating from epoch 0"})
    for name in ALGORITHMS:
        try:
            record = _sync_one(name, device, model, batch, mu, warmup, steps, log_every)
        except Exception as error:  # noqa: BLE001  (recorded as a failed check; the others still run)
            sec.figure(name, {"error": traceback_tail(error)})
            sec.check(f"{name}_no_syncs", False, f"could not be measured: {type(error).__name__}: {error}")
            continue
        sec.figure(name, record)
        total = sum(record["syncs_per_step_list"])
        top = ", ".join(f"{where} x{n}" for where, n in list(record["sync_sources"].items())[:3])
        sec.check(f"{name}_no_syncs", total == 0,
                  f"{record['syncs_per_step']:.1f} syncs/step, {record['copies_per_step']:.1f} copies to the "
                  f"device/step over {len(steps)} steps" + (f"; top: {top}" if top else ""))
        release(device if device.type == "cuda" else torch.device("cpu"))


def _sync_one(name: str, device: torch.device, model: str, batch: int, mu: int,
              warmup: int, steps: list[int], log_every: int) -> dict[str, Any]:
    total_steps = 10_000
    on_meta = device.type == "meta"
    # On meta the set-up runs under a tolerant audit too, so that a value read there cannot stop the check.
    with SyncAudit(device, tolerate=True) if on_meta else contextlib.nullcontext():
        algorithm = build_algorithm(name, total_steps, warmup, device)
        replica, trainer = build_replica(algorithm, model, batch, mu, device)
        for step in range(warmup):
            trainer.step(replica, step)
    synchronize(device)
    run_step = lambda step: trainer.step(replica, step)
    record: dict[str, Any] = {}
    if on_meta:
        audited = _audit_steps(device, steps, run_step, tolerate=True)
        record.update(audited)
        record["source"] = "SyncAudit on meta"
    else:
        per_step, by_line, by_frame, others = _sync_warnings(steps, run_step)
        synchronize(device)
        record.update({"syncs_per_step_list": per_step, "sync_sources": dict(by_frame.most_common()),
                       "sync_warning_lines": dict(by_line.most_common()), "other_warnings": dict(others),
                       "source": "torch.cuda.set_sync_debug_mode('warn')"})
        # The same number of further steps under SyncAudit: host-to-device copies (and its own sync count).
        later = measured_steps(steps[-1] + 1, len(steps), log_every)
        audited = _audit_steps(device, later, run_step, tolerate=False)
        synchronize(device)
        record.update({"copies_per_step_list": audited["copies_per_step_list"],
                       "blocking_copies_per_step_list": audited["blocking_copies_per_step_list"],
                       "copied_bytes_per_step_list": audited["copied_bytes_per_step_list"],
                       "copy_sources": audited["copy_sources"],
                       "audit_syncs_per_step_list": audited["syncs_per_step_list"],
                       "audit_sync_sources": audited["sync_sources"]})
    record["syncs_total"] = int(sum(record["syncs_per_step_list"]))
    record["copies_total"] = int(sum(record["copies_per_step_list"]))
    record["syncs_per_step"] = record["syncs_total"] / len(record["syncs_per_step_list"])
    record["copies_per_step"] = record["copies_total"] / len(record["copies_per_step_list"])
    record["blocking_copies_per_step"] = (sum(record["blocking_copies_per_step_list"])
                                          / len(record["blocking_copies_per_step_list"]))
    return record


# ----- 4. speed -----------------------------------------------------------------------------------
SPEED_CONFIGS = (  # name, train_step.py arguments, TF32
    ("fp32", [], False),
    ("tf32", [], True),
    ("bf16", ["--precision", "bf16"], False),
    ("bf16_channels_last", ["--precision", "bf16", "--channels-last"], False),
)


def section_speed(sec: Section, ctx: Context) -> None:
    from bench import train_step

    warmup, steps = (1, 2) if ctx.quick else (5, 20)
    threads = torch.get_num_threads()
    base = ["--model", ctx.model, "--batch", str(ctx.batch), "--mu", str(ctx.mu), "--warmup", str(warmup),
            "--steps", str(steps), "--device", str(ctx.device), "--threads", str(threads)]
    sec.figure("setup", {"model": ctx.model, "batch": ctx.batch, "mu": ctx.mu, "warmup_steps": warmup,
                         "timed_steps": steps, "threads": threads,
                         "peak_memory": "torch.cuda.max_memory_allocated" if ctx.cuda else "process peak RSS",
                         "fp32": "TF32 off for matmuls and cuDNN", "tf32": "TF32 on for matmuls and cuDNN"})
    if not ctx.cuda:
        sec.note("on the CPU the TF32 flags change nothing, and peak RSS only grows over the process")
    for name, extra, tf32 in SPEED_CONFIGS:
        args = train_step.build_parser().parse_args([*base, *extra])
        previous = train_step.set_tf32(tf32)
        try:
            reset_peak_memory(ctx.device)
            step = train_step.bench_step(args)
            step_peak = peak_memory_mb(ctx.device)
            release(ctx.device)
            reset_peak_memory(ctx.device)
            bare = train_step.bench_bare(args, step["images_per_step"])
            bare_peak = peak_memory_mb(ctx.device)
            gemm = train_step.bench_gemm(args) if ctx.cuda else None
        except Exception as error:  # noqa: BLE001  (recorded as a failed check; the others still run)
            sec.figure(name, {"error": traceback_tail(error)})
            sec.check(f"{name}_runs", False, f"{type(error).__name__}: {error}")
            continue
        finally:
            train_step.restore_tf32(previous)
            release(ctx.device)
        record = {"step_images_per_s": step["images_per_s"], "step_ms": step["ms_per_step"],
                  "images_per_step": step["images_per_step"], "step_gflop": step["gflop_per_step"],
                  "bare_images_per_s": bare["bare_images_per_s"], "bare_ms": bare["bare_ms"],
                  "step_vs_bare": step["images_per_s"] / bare["bare_images_per_s"],
                  "step_tflop_per_s": step["gflop_per_step"] / step["ms_per_step"],
                  "gemm_gflop_per_s": gemm, "step_peak_mb": step_peak, "bare_peak_mb": bare_peak}
        sec.figure(name, record)
        sec.check(f"{name}_runs", record["step_images_per_s"] > 0 and math.isfinite(record["step_images_per_s"]),
                  f"{record['step_images_per_s']:.0f} images/s ({record['step_vs_bare']:.0%} of the bare model), "
                  f"peak {step_peak:.0f} MB")
    args = train_step.build_parser().parse_args(base)
    try:
        data = train_step.bench_data(args)
    except Exception as error:  # noqa: BLE001  (recorded as a failed check; the others still run)
        sec.figure("stream", {"error": traceback_tail(error)})
        sec.check("stream_runs", False, f"{type(error).__name__}: {error}")
        return
    finally:
        release(ctx.device)
    sec.figure("stream", {"images_per_s": data["images_per_s"], "ms_per_batch": data["ms_per_batch"],
                          "images_per_batch": data["images_per_batch"]})
    sec.check("stream_runs", data["images_per_s"] > 0, f"{data['images_per_s']:.0f} images/s (next(stream) alone)")


# ----- 5. memory of time-sliced replicas ---------------------------------------------------------
def _state_mb(replica: Any) -> dict[str, float]:
    """Bytes each part of a replica holds (parameters, buffers, EMA teacher, optimiser state, stream)."""
    def tensors_mb(tensors: Iterator[torch.Tensor]) -> float:
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors) / 2 ** 20

    model = tensors_mb(iter(list(replica.model.parameters()) + list(replica.model.buffers())))
    teacher = tensors_mb(iter(list(replica.teacher.module.parameters()) + list(replica.teacher.module.buffers())))
    optimizer = tensors_mb(value for state in replica.optimizer.state.values() for value in state.values()
                           if isinstance(value, torch.Tensor))
    stream = tensors_mb(value for value in vars(replica.stream).values() if isinstance(value, torch.Tensor))
    return {"model_mb": model, "teacher_mb": teacher, "optimizer_mb": optimizer, "stream_mb": stream}


def section_memory(sec: Section, ctx: Context) -> None:
    """K replicas time-sliced on one device; their streams share one device copy of the images, as in a run."""
    model = "small_cnn" if ctx.quick else "wrn28_8"
    sec.figure("setup", {"model": model, "batch": ctx.batch, "mu": ctx.mu, "precision": "fp32", "algorithm": "fixmatch",
                         "measure": "torch.cuda memory_allocated / max_memory_allocated" if ctx.cuda
                         else "process peak RSS (cannot be reset: grows over the process)"})
    for k in (1, 2, 4):
        release(ctx.device)
        reset_peak_memory(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device) / 2 ** 20 if ctx.cuda else 0.0
        replicas = []
        try:
            pool = {key: value.to(ctx.device) for key, value in
                    random_pool(max(64, ctx.batch), max(256, 2 * ctx.mu * ctx.batch)).items()}
            for index in range(k):
                algorithm = build_algorithm("fixmatch", 10_000, 1, ctx.device)
                replicas.append(build_replica(algorithm, model, ctx.batch, ctx.mu, ctx.device, index, pool=pool))
            for replica, trainer in replicas:  # time-sliced: one step each, all resident
                trainer.step(replica, 0)
            synchronize(ctx.device)
            parts = _state_mb(replicas[0][0])
            stream_mb = parts.pop("stream_mb")
            record = {"state_mb_per_replica": parts, "replica_state_mb_total": k * sum(parts.values()),
                      "stream_mb_shared": stream_mb, "state_mb_total": k * sum(parts.values()) + stream_mb,
                      "peak_mb": peak_memory_mb(ctx.device)}
            if ctx.cuda:
                record["resident_mb"] = torch.cuda.memory_allocated(ctx.device) / 2 ** 20 - before
        except Exception as error:  # noqa: BLE001  (recorded as a failed check; the others still run)
            sec.figure(f"k{k}", {"error": traceback_tail(error)})
            sec.check(f"k{k}_fits", False, f"{type(error).__name__}: {str(error)[:300]}")
            continue
        finally:
            del replicas
            pool = None
            release(ctx.device)
        sec.figure(f"k{k}", record)
        sec.check(f"k{k}_fits", record["peak_mb"] > 0,
                  f"peak {record['peak_mb']:.0f} MB, replicas' state {record['replica_state_mb_total']:.0f} MB")


# ----- 6. end to end ------------------------------------------------------------------------------
@dataclass
class EndToEnd:
    """Sizes of the end-to-end runs in this mode."""

    iterations: int
    stop_at: int
    eval_every: int
    log_every: int
    extra: list[str]
    twa_steps: int
    run_cap_s: float


def end_to_end_sizes(ctx: Context) -> EndToEnd:
    if ctx.quick:
        # K=2, E=2 over 12 steps: episodes of 6; replica 0 stops at step 9, inside episode 2, while
        # replica 1 is still at the episode's start.
        return EndToEnd(12, 9, 6, 3, ["train.batch_size=8", "train.mu=2", "train.eval_batch_size=256"], 5,
                        120 if ctx.cuda else 150)
    return EndToEnd(300, 200, 50, 25, [], 50, 180)


@dataclass
class Job:
    """One training run of section 6: `python main.py` (or torchrun) in a subprocess, or in this process."""

    name: str
    overrides: list[str]
    run_dir: Path
    after: list[str] = field(default_factory=list)   # jobs that must have succeeded first
    nproc: int = 0                                    # > 0: torchrun with this many processes
    in_process: bool = False                          # ssl_imwa.run.run on the composed config
    needs_s: float = 10.0
    record: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    started: float = 0.0
    deadline: float = 0.0


class Runs:
    """Runs section 6's jobs into ctx.work/<name>, `slots` at a time, inside the budget."""

    def __init__(self, sec: Section, ctx: Context) -> None:
        self.sec = sec
        self.ctx = ctx
        self.sizes = end_to_end_sizes(ctx)
        self.slots = max(1, ctx.args.jobs)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not ctx.cuda:
            self.env["OMP_NUM_THREADS"] = str(max(1, ctx.args.threads))
        self.records: dict[str, dict[str, Any]] = sec.figures.setdefault("runs", {})

    def common(self) -> list[str]:
        s = self.sizes
        overrides = ["experiment=quickstart", f"device={self.ctx.device}", "train.progress=false",
                     f"train.iterations={s.iterations}", f"train.eval_every={s.eval_every}",
                     f"train.log_every={s.log_every}", *s.extra]
        if not self.ctx.cuda:
            overrides.append(f"train.num_threads={max(1, self.ctx.args.threads)}")
        return overrides

    def job(self, name: str, overrides: list[str], run_dir: Path | None = None, **options: Any) -> Job:
        if options.get("nproc"):  # several processes: each takes cuda:LOCAL_RANK, so no index may be named
            overrides = [f"device={self.ctx.device.type}" if item.startswith("device=") else item
                         for item in overrides]
        return Job(name, overrides, run_dir or self.ctx.work / name, **options)

    # -- the schedule ------------------------------------------------------------------------------
    def execute(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Start every job whose predecessors succeeded, at most `slots` at once; wait for them all."""
        waiting = list(jobs)
        running: list[Job] = []
        done: dict[str, Job] = {}
        while waiting or running:
            started_any = False
            for job in list(waiting):
                if len(running) >= self.slots:
                    break
                if any(name not in done for name in job.after):
                    continue
                waiting.remove(job)
                failed = [name for name in job.after if done[name].record.get("rc") != 0]
                if failed:
                    self._skip(job, f"skipped: {', '.join(failed)} did not succeed")
                    done[job.name] = job
                elif self.ctx.remaining() - 5.0 < job.needs_s:
                    self._skip(job, f"skipped: {max(0.0, self.ctx.remaining()):.0f} s of the budget left")
                    done[job.name] = job
                elif job.in_process:
                    self._run_in_process(job)  # blocks; background subprocesses go on meanwhile
                    done[job.name] = job
                else:
                    self._start(job)
                    running.append(job)
                started_any = True
            if waiting and not running and not started_any:  # only unknown predecessors left
                for job in waiting:
                    self._skip(job, f"skipped: waits for {', '.join(job.after)}, which never ran")
                    done[job.name] = job
                waiting.clear()
            for job in list(running):
                if job.process is None or job.process.poll() is not None or time.monotonic() > job.deadline:
                    self._finish(job)
                    running.remove(job)
                    done[job.name] = job
            if running:
                time.sleep(0.2)
        return {job.name: job.record for job in jobs}

    def _skip(self, job: Job, why: str) -> None:
        job.record.update({"run_dir": str(job.run_dir), "overrides": job.overrides, "status": why, "rc": None})
        self.records[job.name] = job.record
        self.sec.note(f"{job.name}: {why}")

    def _validate(self, job: Job) -> Any:
        # The config composed and validated here first: a wrong override is named at once, not in a log.
        from ssl_imwa.config import validate

        return validate(compose_config(job.overrides, job.run_dir))

    def _start(self, job: Job) -> None:
        job.record.update({"run_dir": str(job.run_dir), "overrides": job.overrides,
                           "launch": f"torchrun x{job.nproc}" if job.nproc else "python main.py"})
        self.records[job.name] = job.record
        job.started = time.monotonic()
        try:
            self._validate(job)
        except Exception as error:  # noqa: BLE001  (recorded with the run; the other runs still go)
            job.record.update({"rc": None, "status": f"invalid config: {type(error).__name__}: {error}"})
            job.deadline = 0.0
            return
        command = [sys.executable, str(ROOT / "main.py"), *job.overrides, f"hydra.run.dir={job.run_dir}"]
        if job.nproc:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={job.nproc}", *command[1:]]
        job.run_dir.mkdir(parents=True, exist_ok=True)
        job.log_path = job.run_dir.parent / f"{job.run_dir.name}.{job.name}.log"
        timeout = min(self.sizes.run_cap_s * (2 if job.nproc else 1), self.ctx.remaining() - 5.0)
        job.deadline = job.started + max(1.0, timeout)
        print(f"  $ {' '.join(command[1:])}", flush=True)
        with job.log_path.open("w") as log:
            job.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def _finish(self, job: Job) -> None:
        if job.process is None:  # never started (invalid config)
            self._report(job)
            return
        rc = job.process.poll()
        if rc is None:  # past its deadline: the whole process group goes (torchrun's workers too)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
            job.record["status"] = f"timed out after {time.monotonic() - job.started:.0f} s"
        job.record.update({"rc": rc, "seconds": round(time.monotonic() - job.started, 1)})
        output = job.log_path.read_text(errors="replace") if job.log_path else ""
        self._collect(job)
        if rc != 0:
            job.record["output_tail"] = output[-TAIL_CHARS:]
            print(job.record["output_tail"], flush=True)
        self._report(job)

    def _run_in_process(self, job: Job) -> None:
        from ssl_imwa.run import run

        job.record.update({"run_dir": str(job.run_dir), "overrides": job.overrides,
                           "launch": "in process (ssl_imwa.run.run)"})
        self.records[job.name] = job.record
        job.started = time.monotonic()
        print(f"  > run({' '.join(job.overrides)} run_dir={job.run_dir})", flush=True)
        try:
            run(compose_config(job.overrides, job.run_dir))
            job.record["rc"] = 0
        except Exception as error:  # noqa: BLE001  (recorded with the run; the other runs still go)
            job.record.update({"rc": 1, "output_tail": traceback_tail(error)})
            print(job.record["output_tail"], flush=True)
        job.record["seconds"] = round(time.monotonic() - job.started, 1)
        self._collect(job)
        self._report(job)

    def _collect(self, job: Job) -> None:
        status_path = job.run_dir / "status.json"
        if status_path.exists():
            with contextlib.suppress(ValueError):
                job.record["run_status"] = json.loads(status_path.read_text()).get("status")
        results_path = job.run_dir / "results.json"
        if results_path.exists() and job.record.get("run_status") == "complete":
            results = json.loads(results_path.read_text())
            job.record.update({"final_top1": results["final"]["top1"],
                               "final_balanced_acc": results["final"]["balanced_acc"],
                               "wall_time_s": results.get("wall_time_s"), "images_per_s": results.get("images_per_s")})
            if results.get("imwa", {}).get("per_episode"):
                job.record["merges"] = [{key: entry.get(key) for key in ("episode", "strategy", "top1", "accepted")
                                         if key in entry} for entry in results["imwa"]["per_episode"]]

    def _report(self, job: Job) -> None:
        record = job.record
        print(f"  -> {job.name}: rc {record.get('rc')}, {record.get('seconds', 0):.1f} s, "
              f"{record.get('status') or record.get('run_status')}"
              + (f", final top1 {record['final_top1']:.4f}" if "final_top1" in record else ""), flush=True)


def _why(record: dict[str, Any]) -> str:
    """Why a run did not complete, in one line: its status, or the last line of its output."""
    lines = [line for line in str(record.get("output_tail", "")).splitlines() if line.strip()]
    return str(record.get("status") or (lines[-1][:200] if lines else record.get("run_status")))


def _completed(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("rc") == 0 and record.get("run_status") == "complete" and \
        math.isfinite(record.get("final_top1", float("nan")))


def resume_jobs(runs: Runs, label: str, base: list[str], nproc: int = 0, in_process: bool = False) -> list[Job]:
    """An uninterrupted run, and its twin stopped mid-episode then resumed in the same directory."""
    s = runs.sizes
    stopped_dir = runs.ctx.work / f"{label}_stopped"
    return [
        runs.job(f"{label}_full", base, nproc=nproc, needs_s=15.0),
        runs.job(f"{label}_stopped", [*base, f"train.stop_at={s.stop_at}", "train.checkpoint_every=1"], stopped_dir,
                 nproc=nproc, in_process=in_process, needs_s=15.0),
        runs.job(f"{label}_resumed", [*base, "resume=true"], stopped_dir, after=[f"{label}_stopped"], nproc=nproc,
                 in_process=in_process, needs_s=15.0),
    ]


def check_resume(sec: Section, runs: Runs, label: str, records: dict[str, dict[str, Any]], nproc: int = 0,
                 replica_groups: int | None = None) -> None:
    """The resumed run ends bitwise where the uninterrupted one does: every checkpoint tensor, every evaluation.

    `replica_groups`: checkpoint files per run (one per group; default: one per process)."""
    s = runs.sizes
    full, stopped, resumed = (records.get(f"{label}_{part}", {}) for part in ("full", "stopped", "resumed"))
    if stopped.get("rc") == 0:  # its status was read before the resume wrote 'complete' over it
        sec.check(f"{label}_stopped_mid_episode", stopped.get("run_status") == "stopped",
                  f"stop_at={s.stop_at} of {s.iterations} steps (K=2, E=2), status {stopped.get('run_status')}")
    if not (_completed(full) and _completed(resumed)):
        sec.check(f"{label}_resume_bitwise", False,
                  "runs did not all complete: " + "; ".join(
                      f"{part} rc {record.get('rc')}: {_why(record)}"
                      for part, record in (("full", full), ("stopped", stopped), ("resumed", resumed))))
        return
    full_dir, stopped_dir = Path(full["run_dir"]), Path(stopped["run_dir"])
    groups = nproc if replica_groups is None else replica_groups
    names = [f"latest.rank{rank}.pt" for rank in range(groups)] if groups > 1 else ["latest.pt"]
    differences: list[str] = []
    compared = 0
    for name in names:
        left = checkpoint_tensors(full_dir, name)
        right = checkpoint_tensors(stopped_dir, name)
        compared += len(left)
        differences += [f"{name} {line}" for line in tensor_differences(left, right)]
    sec.figure(f"{label}_resume", {"tensors_compared": compared, "differing_tensors": len(differences),
                                   "differences": differences[:50]})
    sec.check(f"{label}_resume_bitwise", compared > 0 and not differences,
              f"{compared} tensors of {', '.join(names)} bitwise equal" if not differences
              else f"{len(differences)} of {compared} tensors differ: " + "; ".join(differences[:3]))

    def evaluations(directory: Path) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [{key: value for key, value in row.items() if key != "time_s"} for row in rows]

    first, second = evaluations(full_dir), evaluations(stopped_dir)
    sec.check(f"{label}_resume_metrics_equal", first == second,
              f"{len(first)} evaluations logged, identical" if first == second
              else f"{len(first)} vs {len(second)} evaluations, contents differ")


def section_end_to_end(sec: Section, ctx: Context) -> None:
    runs = Runs(sec, ctx)
    s = runs.sizes
    ctx.work.mkdir(parents=True, exist_ok=True)
    low, mixed = ("fp16", "bf16") if ctx.cuda else ("fp32", "fp32")
    # On the CPU with --quick only the uninterrupted run goes through `python main.py` (it runs beside
    # the others); the rest run in this process, as a subprocess start costs more than such a run.
    in_process = ctx.quick and not ctx.cuda
    sec.figure("setup", {"preset": "experiment=quickstart (digits, small CNN)", "iterations": s.iterations,
                         "stop_at": s.stop_at, "eval_every": s.eval_every, "extra": s.extra, "work_dir": str(ctx.work),
                         "resume_precision": low, "daso_acr_precision": mixed, "concurrent_runs": runs.slots,
                         "launch": "main.py for the uninterrupted run, ssl_imwa.run.run in process for the others"
                         if in_process else "python main.py for every run"})
    if not ctx.cuda:
        sec.note("cpu: fp32 throughout (fp16/bf16 autocast is slow on this CPU; the GPU run uses fp16 and bf16)")
    base = runs.common()
    resume_base = [*base, "algorithm=fixmatch", f"train.precision={low}", "imwa.k=2", "imwa.episodes=2",
                   "deterministic=true"]
    jobs = resume_jobs(runs, "fixmatch_k2", resume_base, in_process=in_process)
    jobs += [runs.job("daso", [*base, "algorithm=daso_short", f"train.precision={mixed}"], in_process=in_process),
             runs.job("acr", [*base, "algorithm=acr_short", f"train.precision={mixed}"], in_process=in_process),
             runs.job("twa", [*base, "imwa.k=2", "imwa.episodes=2", "imwa.merge=twa", "dataset.val_per_class=10",
                              "dataset.m_max=60", f"imwa.twa.steps={s.twa_steps}", "imwa.twa.batch_size=32"],
                      in_process=in_process)]
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    torchrun = gpus >= 2 or ctx.args.torchrun
    if torchrun:
        jobs += resume_jobs(runs, "torchrun_k2", resume_base, nproc=2)
        # imwa.data_parallel=2: both replicas in one group of two processes (DDP, SyncBatchNorm over NCCL).
        jobs += resume_jobs(runs, "dp2_k2", [*resume_base, "imwa.data_parallel=2", "model.sync_batchnorm=true"],
                            nproc=2)
    records = runs.execute(jobs)
    check_resume(sec, runs, "fixmatch_k2", records)
    ran = lambda record: not str(record.get("status", "")).startswith("skipped")  # skipped: a note, not a failure
    for name in ("daso", "acr"):
        record = records[name]
        if ran(record):
            sec.check(f"{name}_completes", _completed(record),
                      f"final top1 {record['final_top1']:.4f} in {record.get('seconds')} s" if _completed(record)
                      else f"rc {record.get('rc')}: {_why(record)}")
    record = records["twa"]
    if ran(record):
        strategies = [merge.get("strategy") for merge in record.get("merges", [])]
        sec.check("twa_completes", _completed(record) and strategies == ["twa", "twa"],
                  f"merges {strategies}, final top1 {record['final_top1']:.4f}" if _completed(record)
                  else f"rc {record.get('rc')}: {_why(record)}")
    if torchrun:
        check_resume(sec, runs, "torchrun_k2", records, nproc=2)
        check_resume(sec, runs, "dp2_k2", records, nproc=2, replica_groups=1)
    else:
        sec.figure("torchrun", "skipped: one GPU" if ctx.cuda else "skipped: cpu run")
        sec.note("torchrun resume: skipped, " + ("one GPU" if ctx.cuda else "not run on the CPU"))


# ----- summary ------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def _render_versions(figures: dict[str, Any]) -> list[str]:
    gpus = "; ".join(f"{gpu['name']} ({gpu['memory_gib']} GiB, sm {gpu['capability']}, {gpu['multiprocessors']} SMs)"
                     for gpu in figures.get("gpus", [])) or "none"
    rows = [("GPU", gpus), ("torch", figures.get("torch")), ("CUDA / cuDNN", f"{figures.get('cuda')} / {figures.get('cudnn')}"),
            ("TF32 defaults (matmul / cuDNN)", (f"{figures.get('tf32_defaults', {}).get('matmul')} / "
                                               f"{figures.get('tf32_defaults', {}).get('cudnn')}")),
            ("Python", figures.get("python")), ("CPU", f"{figures.get('cpu')} ({figures.get('cpu_count')} cores)"),
            ("hydra-core / omegaconf", f"{figures.get('hydra')} / {figures.get('omegaconf')}"),
            ("torchvision / numpy", f"{figures.get('torchvision')} / {figures.get('numpy')}"),
            ("commit", figures.get("git_commit"))]
    return ["| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows]]


def _render_syncs(figures: dict[str, Any]) -> list[str]:
    setup = figures.get("setup", {})
    lines = [(f"{setup.get('method')}; {setup.get('model')}, B={setup.get('batch')} mu={setup.get('mu')}, "
             f"{len(setup.get('measured_steps', []))} steady-state steps after {setup.get('warmup_steps')} warm-up "
             "(steps whose outputs the orchestrator logs left out)."), "",
             "| algorithm | syncs/step | copies to device/step (blocking) | syncs from | copies from |",
             "|---|---|---|---|---|"]
    for name in ALGORITHMS:
        record = figures.get(name, {})
        if "error" in record:
            lines.append(f"| {name} | error | error | {record['error'].strip().splitlines()[-1][:120]} | |")
            continue
        if not record:
            continue
        sources = ", ".join(f"`{where}` x{count}" for where, count in list(record.get("sync_sources", {}).items())[:4])
        copies = ", ".join(f"`{where}` x{count}" for where, count in list(record.get("copy_sources", {}).items())[:3])
        lines.append(f"| {name} | {record['syncs_per_step']:.1f} | {record['copies_per_step']:.1f} "
                     f"({record['blocking_copies_per_step']:.1f}) | {sources or '-'} | {copies or '-'} |")
    return lines


def _render_speed(figures: dict[str, Any]) -> list[str]:
    setup = figures.get("setup", {})
    lines = [(f"FixMatch `Trainer.step`, {setup.get('model')}, B={setup.get('batch')} mu={setup.get('mu')} "
             f"({setup.get('timed_steps')} timed steps after {setup.get('warmup_steps')} warm-up); the bare model is "
             "forward + backward of the same images with one cross-entropy; peak memory: "
             f"{setup.get('peak_memory')}."), "",
             ("| configuration | step images/s | bare model images/s | step / bare | step TFLOP/s | GEMM GFLOP/s "
             "| peak MB (step) | peak MB (bare) |"), "|---|---|---|---|---|---|---|---|"]
    for name, _, _ in SPEED_CONFIGS:
        record = figures.get(name)
        if not record:
            continue
        if "error" in record:
            lines.append(f"| {name} | error: {record['error'].strip().splitlines()[-1][:100]} | | | | | | |")
            continue
        lines.append(f"| {name} | {_fmt(record['step_images_per_s'])} | {_fmt(record['bare_images_per_s'])} | "
                     f"{record['step_vs_bare']:.0%} | {_fmt(record['step_tflop_per_s'], 2)} | "
                     f"{_fmt(record['gemm_gflop_per_s'])} | {_fmt(record['step_peak_mb'])} | "
                     f"{_fmt(record['bare_peak_mb'])} |")
    if "stream" in figures:
        lines += ["", (f"Data stream alone (`next(stream)`, {figures['stream']['images_per_batch']} images a batch): "
                      f"{_fmt(figures['stream']['images_per_s'])} images/s.")]
    return lines


def _render_memory(figures: dict[str, Any]) -> list[str]:
    setup = figures.get("setup", {})
    lines = [(f"{setup.get('model')}, FixMatch, B={setup.get('batch')} mu={setup.get('mu')}, fp32, one step per "
             f"replica; {setup.get('measure')}."), "",
             ("| K | replicas' state (models + teachers + momentum), MB | stream images (shared), MB "
             "| resident after the steps, MB | peak, MB |"),
             "|---|---|---|---|---|"]
    for k in (1, 2, 4):
        record = figures.get(f"k{k}")
        if not record:
            continue
        if "error" in record:
            lines.append(f"| {k} | error: {record['error'].strip().splitlines()[-1][:100]} | | | |")
            continue
        lines.append(f"| {k} | {_fmt(record['replica_state_mb_total'], 1)} | {_fmt(record['stream_mb_shared'], 1)} | "
                     f"{_fmt(record.get('resident_mb'))} | {_fmt(record['peak_mb'])} |")
    return lines


def _render_end_to_end(figures: dict[str, Any]) -> list[str]:
    setup = figures.get("setup", {})
    lines = [(f"{setup.get('preset')}, {setup.get('iterations')} steps (stop at {setup.get('stop_at')}); "
             f"resume runs in {setup.get('resume_precision')}, DASO and ACR in {setup.get('daso_acr_precision')}."), "",
             "| run | result | seconds | final top-1 | balanced | images/s |", "|---|---|---|---|---|---|"]
    for name, record in figures.get("runs", {}).items():
        result = record.get("status") or record.get("run_status") or f"rc {record.get('rc')}"
        lines.append(f"| {name} | {result} | {_fmt(record.get('seconds'), 1)} | {_fmt(record.get('final_top1'), 4)} | "
                     f"{_fmt(record.get('final_balanced_acc'), 4)} | {_fmt(record.get('images_per_s'))} |")
    if isinstance(figures.get("torchrun"), str):
        lines += ["", f"torchrun: {figures['torchrun']}."]
    return lines


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "versions": _render_versions, "syncs": _render_syncs, "speed": _render_speed, "memory": _render_memory,
    "end_to_end": _render_end_to_end,
}


def render_summary(payload: dict[str, Any]) -> str:
    sections = payload["sections"]
    versions = sections.get("versions", {}).get("figures", {})
    total = payload["checks_total"]
    failed = payload["failed_checks"]
    lines = [f"## GPU smoke check: {payload['device_name']}", "",
             f"`python -m bench.gpu_smoke --device {payload['device'].split(':')[0]}{' --quick' if payload['quick'] else ''}`"
             f", {payload['started']}, device `{payload['device']}` ({payload['device_name']}), torch "
             f"{versions.get('torch', torch.__version__)}, CUDA {versions.get('cuda')}, Python "
             f"{versions.get('python', platform.python_version())}; {payload['wall_s']:.0f} s"
             + (f" of a {payload['budget_s']:.0f} s budget." if payload["budget_s"] else "."), "",
             f"**{'PASSED' if payload['passed'] else 'FAILED'}**: {total - len(failed)} of {total} checks passed"
             + (f"; failed: {', '.join(failed)}" if failed else "")
             + (f"; sections that broke: {', '.join(payload['errors'])}" if payload["errors"] else "") + ".", "",
             "| section | check | result | detail |", "|---|---|---|---|"]
    for key, section in sections.items():
        if not section["checks"]:
            lines.append(f"| {key} | - | {section['status']} | {'; '.join(section['notes'])[:200]} |")
        for name, check in section["checks"].items():
            detail = check["detail"].replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {key} | {name} | {'pass' if check['passed'] else '**FAIL**'} | {detail} |")
    for number, (key, section) in enumerate(sections.items(), start=1):
        lines += ["", f"### {number}. {section['title']} ({section['status']}, {section['seconds']:.1f} s)", ""]
        renderer = RENDERERS.get(key)
        if renderer is not None and section["figures"]:
            try:
                lines += renderer(section["figures"])
            except Exception as error:  # noqa: BLE001  (the summary must not lose the rest over one figure)
                lines.append(f"(could not render: {type(error).__name__}: {error})")
        for note in section["notes"]:
            lines.append(f"- {note}")
        if section["error"]:
            lines += ["", "```", section["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


# ----- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where smoke.json and summary.md go")
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N) or cpu")
    parser.add_argument("--quick", action="store_true", help="small CNN, tiny batches, a few steps")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds; optional sections that no longer fit are skipped "
                             "(default 480 on cuda, 600 on cpu; 0: no limit)")
    parser.add_argument("--work", type=Path, default=None, help="run directories of section 6 (default OUT/runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu, torch's on cuda)")
    parser.add_argument("--jobs", type=int, default=2, help="section 6: training runs at once (default 2)")
    parser.add_argument("--torchrun", action="store_true",
                        help="section 6: the torchrun resume check even with fewer than two GPUs "
                             "(two processes on one GPU, or gloo on the CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if args.budget_s is None:
        args.budget_s = 480.0 if device.type == "cuda" else 600.0
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or args.out / "runs").resolve()
    ctx = Context(args, device, args.out.resolve(), work)
    with contextlib.suppress(Exception):
        from ssl_imwa.run import tune_glibc_malloc

        tune_glibc_malloc()  # as every training run does
    print(f"# GPU smoke check on {device} ({ctx.device_name}), quick={args.quick}, "
          f"budget {args.budget_s:.0f} s, out {ctx.out}", flush=True)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    smoke = Smoke(ctx)
    smoke.run("versions", "Versions and device", section_versions, optional=False)
    smoke.run("stream_parity", "Stream parity (CPU vs device)", section_stream_parity, optional=False)
    smoke.run("syncs", "Host-device syncs per steady-state step", section_syncs, optional=True, needs_s=20)
    smoke.run("speed", "FixMatch step speed", section_speed, optional=True, needs_s=30)
    smoke.run("memory", "Memory of time-sliced replicas", section_memory, optional=True, needs_s=20)
    smoke.run("end_to_end", "End to end through main.py", section_end_to_end, optional=True, needs_s=20)
    summary = smoke.write()
    print("\n" + summary, flush=True)
    print(f"wrote {ctx.out / 'smoke.json'} and {ctx.out / 'summary.md'}", flush=True)
    return 0 if smoke.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
