"""The command line of the smoke check: parse, set up the device, run the six sections in order."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from bench.gpu_smoke import __doc__ as PACKAGE_DOC
from bench.gpu_smoke.end_to_end import section_end_to_end
from bench.gpu_smoke.harness import Context, Smoke
from bench.gpu_smoke.report import render_summary
from bench.gpu_smoke.sections import (
    section_memory,
    section_speed,
    section_stream_parity,
    section_versions,
)
from bench.gpu_smoke.syncs import section_syncs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.splitlines()[0])
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
        from ssl_imwa.builders import tune_glibc_malloc

        tune_glibc_malloc()  # as every training run does
    print(f"# GPU smoke check on {device} ({ctx.device_name}), quick={args.quick}, "
          f"budget {args.budget_s:.0f} s, out {ctx.out}", flush=True)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    smoke = Smoke(ctx, render_summary)
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
