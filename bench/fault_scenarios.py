"""Faults a run meets in ordinary use, each made for real: does the run survive with nothing lost?

Each scenario trains the quick start briefly in fresh processes, makes the fault (a kill, a full
disk, a damaged file, a bad sweep job, a planted checkpoint), and checks what matters afterwards
against one uninterrupted reference run: the weights bitwise, the evaluation history, the run's
status, the files left behind. `python -m bench.fault_battery` runs them after its bad inputs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["experiment=quickstart", "train.iterations=40", "train.eval_every=10", "train.checkpoint_every=5",
       "train.batch_size=16", "train.mu=2", "train.num_threads=1", "train.progress=false"]


@dataclass(frozen=True)
class Outcome:
    survived: bool
    note: str


def main_py(run_dir: Path, env: dict[str, str], *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "time_s"} for row in rows]


def _same_as(reference: Path, run_dir: Path) -> str | None:
    """What differs from the uninterrupted run (None: nothing): weights bitwise, evaluations, status."""
    import torch

    from ssl_imwa.checkpoint import read_checkpoint, replica_tensors

    load = lambda path: replica_tensors(read_checkpoint(path / "checkpoints" / "latest.pt"))
    ours, theirs = load(run_dir), load(reference)
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[key], theirs[key]) for key in ours):
        return "weights differ from the uninterrupted run"
    if _rows(run_dir) != _rows(reference):
        return "metrics.jsonl differs from the uninterrupted run"
    status = json.loads((run_dir / "status.json").read_text())["status"]
    return None if status == "complete" else f"status {status}"


def _start(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared: {process.stdout.read()[-2000:] if process.stdout else ''}")
        time.sleep(0.05)


def sigkill_then_resume(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    run_dir = scratch / "killed"
    process = _start(run_dir, env)
    _wait_for(run_dir / "checkpoints" / "latest.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = main_py(run_dir, env, "resume=true")
    differs = _same_as(reference, run_dir) if resumed.returncode == 0 else f"resume exited {resumed.returncode}"
    return Outcome(differs is None, differs or "SIGKILL after the first checkpoint; the resume equals the reference")


def ctrl_c_then_resume(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    run_dir = scratch / "interrupted"
    process = _start(run_dir, env)
    _wait_for(run_dir / "checkpoints" / "latest.pt", process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    if process.returncode != 130 or "continue with: python main.py resume=true" not in output:
        return Outcome(False, f"Ctrl-C exited {process.returncode}: {output.strip().splitlines()[-1:]}")
    resumed = main_py(run_dir, env, "resume=true")
    differs = _same_as(reference, run_dir) if resumed.returncode == 0 else f"resume exited {resumed.returncode}"
    return Outcome(differs is None, differs or "exit 130 with the resume line; the resume equals the reference")


def _damaged_history(damage: Callable[[Path], None], what: str) -> Callable[[Path, Path, dict[str, str]], Outcome]:
    def scenario(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
        run_dir = scratch / what.replace(" ", "_")
        main_py(run_dir, env, "train.stop_at=25")
        damage(run_dir / "metrics.jsonl")
        resumed = main_py(run_dir, env, "resume=true")
        differs = _same_as(reference, run_dir) if resumed.returncode == 0 else f"resume exited {resumed.returncode}"
        return Outcome(differs is None, differs or f"{what}; every evaluation is back after the resume")
    return scenario


def _tear_last_line(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])


def fill_the_disk(folder: Path) -> None:
    """Write zeros into `folder/filler` until its file system says it is full."""
    with (folder / "filler").open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def full_disk(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    mount_point = scratch / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                                           capture_output=True, check=False).returncode != 0:
        return Outcome(True, "skipped: no tmpfs can be mounted here (tests/test_storage_faults.py needs root)")
    try:
        run_dir = mount_point / "run"
        process = _start(run_dir, env, "train.iterations=2000")
        _wait_for(run_dir / "checkpoints" / "latest.pt", process)
        fill_the_disk(mount_point)
        output, _ = process.communicate(timeout=300)
        status = json.loads((run_dir / "status.json").read_text())["status"]
        leftovers = [path.name for path in run_dir.rglob("*.tmp")]
        message = output[output.find("error: "):].strip().splitlines()
        survived = (process.returncode == 1 and status == "failed" and not leftovers and len(message) <= 2
                    and "ENOSPC" in message[0] and "Traceback" not in output)
        return Outcome(survived, f"8 MB tmpfs filled after the first checkpoint: status {status}, "
                                 f"{len(leftovers)} temporaries left, {message[0][:100]}")
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def bad_job_in_a_sweep(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    sweep = scratch / "sweep"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "-m", *RUN, "train.iterations=5",
                             "train.lr=-1,0.03", f"hydra.sweep.dir={sweep}"], env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    statuses = sorted(json.loads(path.read_text())["status"] for path in sweep.glob("*/status.json"))
    survived = result.returncode == 1 and statuses == ["complete", "failed"]
    return Outcome(survived, f"train.lr=-1,0.03: exit {result.returncode}, jobs {statuses}")


def planted_checkpoint(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    import torch

    run_dir, marker = scratch / "planted", scratch / "payload_ran"
    shutil.copytree(reference, run_dir)
    path = run_dir / "checkpoints" / "latest.pt"
    payload = torch.load(path, weights_only=True)
    payload["tree"]["note"] = _RunsACommand(str(marker))
    torch.save(payload, path)
    resumed = main_py(run_dir, env, "resume=true")
    evaluated = subprocess.run([sys.executable, "-m", "ssl_imwa.evaluate", str(run_dir)], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=600, check=False)
    survived = (resumed.returncode == 1 and evaluated.returncode == 1 and not marker.exists()
                and "refused" in resumed.stderr and "refused" in evaluated.stderr)
    return Outcome(survived, f"os.system payload in latest.pt: resume exit {resumed.returncode}, evaluate exit "
                             f"{evaluated.returncode}, payload {'RAN' if marker.exists() else 'never ran'}")


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def report_into_a_run(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    run_dir = scratch / "reported"
    shutil.copytree(reference, run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    result = subprocess.run([sys.executable, "-m", "ssl_imwa.report", str(run_dir), "--out", str(run_dir),
                             "--tensorboard"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    after = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    survived = result.returncode == 1 and before == after
    return Outcome(survived, f"report --out RUN --tensorboard: exit {result.returncode}, run "
                             f"{'untouched' if before == after else 'CHANGED'}")


def process_0_killed_under_torchrun(scratch: Path, reference: Path, env: dict[str, str]) -> Outcome:
    run_dir = scratch / "torchrun"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "main.py"), *RUN, "train.iterations=400", "train.eval_every=200",
                              "train.checkpoint_every=200", "imwa.k=2", "imwa.episodes=2", "imwa.timeout_s=60",
                              f"hydra.run.dir={run_dir}"], env=env, cwd=scratch, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(run_dir / "checkpoints" / "merge_001.rank0.pt", agent)
    time.sleep(0.5)
    os.kill(json.loads((run_dir / ".lock").read_text())["pid"], signal.SIGKILL)
    agent.communicate(timeout=300)
    status = json.loads((run_dir / "status.json").read_text())
    survived = status["status"] == "failed" and "process 0" in (status["error"] or "")
    return Outcome(survived, f"SIGKILL to process 0 in episode 2: status {status['status']}, "
                             f"{(status['error'] or '')[:70]}")


SCENARIOS: dict[str, Callable[[Path, Path, dict[str, str]], Outcome]] = {
    "SIGKILL mid-run, then resume": sigkill_then_resume,
    "Ctrl-C mid-run, then resume": ctrl_c_then_resume,
    "metrics.jsonl torn mid-line, then resume": _damaged_history(_tear_last_line, "last line torn"),
    "metrics.jsonl deleted, then resume": _damaged_history(Path.unlink, "metrics.jsonl deleted"),
    "disk full during a run": full_disk,
    "process 0 killed under torchrun": process_0_killed_under_torchrun,
    "one bad job in a sweep": bad_job_in_a_sweep,
    "a checkpoint carrying code": planted_checkpoint,
    "the report pointed into a run": report_into_a_run,
}


def run_scenarios(scratch: Path, env: dict[str, str]) -> list[tuple[str, Outcome]]:
    """Every scenario against one reference run trained first, uninterrupted."""
    reference = scratch / "reference"
    trained = main_py(reference, env)
    if trained.returncode != 0:
        raise RuntimeError(f"the reference run failed: {trained.stderr[-2000:]}")
    outcomes = []
    for name, scenario in SCENARIOS.items():
        folder = scratch / f"scenario{len(outcomes) + 1:02d}"
        folder.mkdir()
        try:
            outcome = scenario(folder, reference, env)
        except Exception as error:  # noqa: BLE001 - a scenario that cannot even be set up has not survived
            outcome = Outcome(False, f"{type(error).__name__}: {error}")
        outcomes.append((name, outcome))
        print(f"   {'pass' if outcome.survived else 'FAIL'} {name:45s} {outcome.note[:110]}", flush=True)
    return outcomes
