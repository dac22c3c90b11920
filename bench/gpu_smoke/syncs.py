"""Section 3 of the smoke check: host-device syncs and host-to-device copies per steady-state step.

On a GPU the sync debug mode's warnings are counted per step and by source; on the CPU the same
steps run on the `meta` device under ssl_imwa.sync_audit.SyncAudit, a stand-in that counts what
would block the host.
"""
from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._common import ROOT, synchronize
from bench.gpu_smoke.harness import (
    ALGORITHMS,
    Context,
    RandomData,
    Section,
    build_replicas,
    release,
    smoke_config,
    traceback_tail,
)
from ssl_imwa.sync_audit import SyncAudit, repository_frame

# This package's files: a sync is attributed to the repository frame that called into them, not to them.
THIS_PACKAGE = tuple(path.resolve() for path in Path(__file__).parent.glob("*.py"))


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
        by_repository_frame[repository_frame(traceback.extract_stack(), skip=THIS_PACKAGE)] += 1

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
    on_meta = device.type == "meta"
    # On meta the set-up runs under a tolerant audit too, so that a value read there cannot stop the check.
    with SyncAudit(device, tolerate=True) if on_meta else contextlib.nullcontext():
        (replica,), trainer = build_replicas(smoke_config(name, model, batch, mu, warmup), RandomData(batch, mu), device)
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
