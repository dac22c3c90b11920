"""The smoke check's summary.md: a verdict, one row per check, then each section's figures as Markdown
tables, ready to paste into docs/performance.md."""
from __future__ import annotations

import math
import platform
from collections.abc import Callable
from typing import Any

import torch

from bench.gpu_smoke.harness import ALGORITHMS, SPEED_CONFIGS


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
