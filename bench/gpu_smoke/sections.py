"""Sections 1, 2, 4 and 5 of the smoke check: versions, stream parity, step speed, and the memory of
time-sliced replicas (3, host-device syncs, is bench.gpu_smoke.syncs; 6, end to end, bench.gpu_smoke.end_to_end)."""
from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterator
from typing import Any

import torch

from bench._common import (
    ROOT,
    cpu_name,
    device_summary,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)
from bench.gpu_smoke.harness import (
    SPEED_CONFIGS,
    Context,
    RandomData,
    Section,
    build_replicas,
    make_stream,
    random_pool,
    release,
    smoke_config,
    traceback_tail,
)


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


# ----- 4. speed -----------------------------------------------------------------------------------
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
        try:
            record = _speed_one(train_step.build_parser().parse_args([*base, *extra]), tf32, ctx)
        except Exception as error:  # noqa: BLE001  (recorded as a failed check; the others still run)
            sec.figure(name, {"error": traceback_tail(error)})
            sec.check(f"{name}_runs", False, f"{type(error).__name__}: {error}")
            continue
        sec.figure(name, record)
        sec.check(f"{name}_runs", record["step_images_per_s"] > 0 and math.isfinite(record["step_images_per_s"]),
                  f"{record['step_images_per_s']:.0f} images/s ({record['step_vs_bare']:.0%} of the bare model), "
                  f"peak {record['step_peak_mb']:.0f} MB")
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


def _speed_one(args: Any, tf32: bool, ctx: Context) -> dict[str, Any]:
    """One configuration: bench/train_step.py's step, bare model and (on a GPU) GEMM rate, each with its peak."""
    from bench import train_step

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
    finally:
        train_step.restore_tf32(previous)
        release(ctx.device)
    return {"step_images_per_s": step["images_per_s"], "step_ms": step["ms_per_step"],
            "images_per_step": step["images_per_step"], "step_gflop": step["gflop_per_step"],
            "bare_images_per_s": bare["bare_images_per_s"], "bare_ms": bare["bare_ms"],
            "step_vs_bare": step["images_per_s"] / bare["bare_images_per_s"],
            "step_tflop_per_s": step["gflop_per_step"] / step["ms_per_step"],
            "gemm_gflop_per_s": gemm, "step_peak_mb": step_peak, "bare_peak_mb": bare_peak}


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
    cfg = smoke_config("fixmatch", model, ctx.batch, ctx.mu)
    for k in (1, 2, 4):
        release(ctx.device)
        reset_peak_memory(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device) / 2 ** 20 if ctx.cuda else 0.0
        replicas: list[Any] = []
        try:
            replicas, trainer = build_replicas(cfg, RandomData(ctx.batch, ctx.mu), ctx.device, count=k)
            for replica in replicas:  # time-sliced: one step each, all resident
                trainer.step(replica, 0)
            synchronize(ctx.device)
            parts = _state_mb(replicas[0])
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
            release(ctx.device)
        sec.figure(f"k{k}", record)
        sec.check(f"k{k}_fits", record["peak_mb"] > 0,
                  f"peak {record['peak_mb']:.0f} MB, replicas' state {record['replica_state_mb_total']:.0f} MB")
