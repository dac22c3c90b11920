"""Section 6 of the smoke check, end to end: training runs through `python main.py` (Hydra) or torchrun,
scheduled a few at a time inside the time budget, and the checks on what they wrote (an exact resume
mid-episode, DASO and ACR completing, a TWA merge)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench._common import ROOT, checkpoint_tensors, compose_config, tensor_differences
from bench.gpu_smoke.harness import TAIL_CHARS, Context, Section, traceback_tail


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
    check_completed(sec, records)
    if torchrun:
        check_resume(sec, runs, "torchrun_k2", records, nproc=2)
        check_resume(sec, runs, "dp2_k2", records, nproc=2, replica_groups=1)
    else:
        sec.figure("torchrun", "skipped: one GPU" if ctx.cuda else "skipped: cpu run")
        sec.note("torchrun resume: skipped, " + ("one GPU" if ctx.cuda else "not run on the CPU"))


def check_completed(sec: Section, records: dict[str, dict[str, Any]]) -> None:
    """DASO and ACR complete; the TWA run completes with a TWA merge at both episode ends. A run the budget
    skipped is a note, not a failure."""
    ran = lambda record: not str(record.get("status", "")).startswith("skipped")
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
