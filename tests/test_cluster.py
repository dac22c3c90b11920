"""Sweeps through Hydra's submitit launcher: on this machine (hydra/launcher=local) and on a real
single-node Slurm cluster (hydra/launcher=slurm, tests/slurm_cluster.py), including a job that Slurm
preempts and requeues mid-run, which resumes to bitwise the uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reference_runs import DISTRIBUTED, IMWA, TINY, ReferenceRun
from tests.utils import (
    ROOT,
    assert_bitwise_equal,
    assert_same_run,
    checkpoint_tensors,
    read_results,
)

pytestmark = pytest.mark.slow
# A Slurm job on the test cluster: no GPU, one CPU, a little memory.
ON_TEST_CLUSTER = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                   "hydra.launcher.signal_delay_s=5"]


def _sweep(overrides: list[str], sweep_dir: Path, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout,
                          check=False)


def _assert_the_two_seeds_ran(sweep_dir: Path, result: subprocess.CompletedProcess, reference_run: ReferenceRun
                              ) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in sweep_dir.iterdir() if not path.name.startswith(".")) == \
        ["multirun.yaml", "seed=0", "seed=1"], "each job's directory names the key the sweep varies"
    for seed in (0, 1):
        job = sweep_dir / f"seed={seed}"
        assert json.loads((job / "status.json").read_text())["status"] == "complete"
        assert f"seed: {seed}\n" in (job / "config.yaml").read_text()
    # a job is the run main.py would have made: seed 0's equals the in-process reference bitwise
    reference = reference_run([*TINY, "seed=0"])
    assert_same_run(reference, sweep_dir / "seed=0")


def test_a_sweep_runs_each_point_as_its_own_process_on_this_machine(tmp_path: Path,
                                                                     reference_run: ReferenceRun) -> None:
    result = _sweep(["hydra/launcher=local", *TINY, "seed=0,1"], tmp_path / "sweep")
    _assert_the_two_seeds_ran(tmp_path / "sweep", result, reference_run)
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2, "two submitit jobs"


def test_a_job_that_failed_in_its_own_process_sets_the_sweep_exit_status(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = _sweep(["hydra/launcher=local", *TINY, "train.lr=-1,0.03"], sweep_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"1 of 2 sweep jobs failed ({sweep_dir / 'train.lr=-1'})" in result.stderr, result.stderr[-3000:]
    assert json.loads((sweep_dir / "train.lr=0.03" / "status.json").read_text())["status"] == "complete"
    # a later sweep into the same directory counts its own jobs, not the failure already there
    result = _sweep(["hydra/launcher=local", *TINY, "train.lr=0.02,0.05"], sweep_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed" not in result.stderr


def _documented_sweeps() -> list[list[str]]:
    """docs/cluster.md's `python main.py -m ...` command blocks, continuation lines joined, as arguments."""
    lines = (ROOT / "docs" / "cluster.md").read_text().replace("\\\n", " ").splitlines()
    return [line.split()[2:] for line in lines if line.startswith("python main.py -m ")]


def test_the_documented_cluster_sweeps_are_valid_and_the_study_is_126_jobs(tmp_path: Path) -> None:
    sweeps = _documented_sweeps()
    assert len(sweeps) == 3, "the study, the torchrun sweep and the search"
    outputs = []
    for arguments in sweeps:
        arguments = [argument.replace("/scratch/$USER", str(tmp_path)) for argument in arguments]
        checked = subprocess.run([sys.executable, str(ROOT / "main.py"), *arguments, "--check"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300, check=False)
        assert checked.returncode == 0, checked.stderr[-3000:]
        outputs.append(checked.stdout + checked.stderr)
    assert "config OK: 126 jobs" in outputs[0], outputs[0][-2000:]
    assert not any(tmp_path.iterdir()), "--check writes nothing"


def test_a_sweep_runs_each_point_as_a_slurm_job(tmp_path: Path, slurm_cluster: dict[str, str],
                                                 reference_run: ReferenceRun) -> None:
    result = _sweep(["hydra/launcher=slurm", *ON_TEST_CLUSTER, *TINY, "seed=0,1"], tmp_path / "sweep", slurm_cluster)
    _assert_the_two_seeds_ran(tmp_path / "sweep", result, reference_run)
    scripts = list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))
    assert scripts and "#SBATCH --requeue" in scripts[0].read_text() and "--signal=USR2@5" in scripts[0].read_text()
    # the report of a sweep that ran on the cluster, as of any sweep (docs/cluster.md)
    report = subprocess.run([sys.executable, "-m", "ssl_imwa.report", str(tmp_path / "sweep"), "--out",
                             str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert rows[1].startswith("all runs,2,0,0,0,"), rows   # the two seeds, none crashed, stopped or running


# Slows each training step when SSL_IMWA_TEST_STEP_SLEEP is set, so a preemption lands mid-run; sleeping
# changes no number, so the uninterrupted reference is trained without it.
SLOW_STEPS = """
import os
import time

from ssl_imwa.trainer import Trainer

if os.environ.get("SSL_IMWA_TEST_STEP_SLEEP"):
    real_step = Trainer.step

    def step(self, replica, at):
        time.sleep(float(os.environ["SSL_IMWA_TEST_STEP_SLEEP"]))
        return real_step(self, replica, at)

    Trainer.step = step
"""


def _slurm_job_ids(env: dict[str, str]) -> list[str]:
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, check=True)
    return [line.split()[0] for line in queue.stdout.splitlines() if line.split()[1] == "RUNNING"]


@pytest.mark.parametrize("preemption", ["scontrol requeue", "SIGUSR2 before the time limit"])
def test_a_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_result(
        tmp_path: Path, slurm_cluster: dict[str, str], reference_run: ReferenceRun, preemption: str) -> None:
    """Slurm stops the job mid-run, the run checkpoints at the step boundary, the job goes back to the
    queue, and the requeued job continues the run (SLURM_RESTART_COUNT) to bitwise the uninterrupted one."""
    overrides = [*IMWA, "train.iterations=60", "train.eval_every=10"]
    sweep_dir = tmp_path / "sweep"
    (tmp_path / "slow_steps.py").write_text(SLOW_STEPS)
    env = {**slurm_cluster, "SSL_IMWA_TEST_STEP_SLEEP": "0.1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    launch = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "-m", "hydra/launcher=slurm", *ON_TEST_CLUSTER,
                               *overrides, "plugins=[slow_steps]", "seed=0", f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (runs := list(sweep_dir.glob("*/metrics.jsonl"))) or not _slurm_job_ids(slurm_cluster):
        assert time.monotonic() < deadline and launch.poll() is None, "the job never started training"
        time.sleep(0.5)
    run_dir = runs[0].parent
    (job,) = _slurm_job_ids(slurm_cluster)
    command = ["scontrol", "requeue", job] if preemption == "scontrol requeue" else ["scancel", "--signal=USR2", job]
    subprocess.run(command, env=slurm_cluster, check=True, capture_output=True)
    # Slurm starts the requeued job again by itself, once its old credential has expired (the test cluster's
    # cred_expire, 15 s): starting it sooner (scontrol update StartTime=now) races slurmd, which then refuses
    # the job ("Job credential revoked") and the job fails instead of resuming.
    output, _ = launch.communicate(timeout=600)
    assert launch.returncode == 0, output[-3000:]
    log = (run_dir / "main.log").read_text()
    assert "stopping after the current step, with a checkpoint there" in log, log[-3000:]
    assert "Slurm requeued this job (restart 1" in log, log[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    full = reference_run([*overrides, "seed=0"])
    assert_same_run(full, run_dir)


def test_a_job_of_two_tasks_trains_the_replicas_in_two_processes(tmp_path: Path, slurm_cluster: dict[str, str],
                                                                  reference_run: ReferenceRun) -> None:
    """hydra/launcher=slurm_torchrun: two Slurm tasks, ranks from Slurm's environment, K=2 over two
    processes: the merged weights are those of the one-process run."""
    result = _sweep(["hydra/launcher=slurm_torchrun", *ON_TEST_CLUSTER, "hydra.launcher.tasks_per_node=2",
                     *DISTRIBUTED], tmp_path / "sweep", slurm_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (tmp_path / "sweep").glob("*/results.json")
    run_dir = results.parent
    assert read_results(run_dir)["imwa"]["processes"] == 2
    single = checkpoint_tensors(reference_run(IMWA))
    replica_0 = lambda tensors: {key: value for key, value in tensors.items()
                                 if key.startswith(("0.model.", "0.teacher."))}
    for rank in (0, 1):   # each process holds its replica, merged: replica 0's weights are the merged ones
        assert_bitwise_equal(replica_0(checkpoint_tensors(run_dir, f"latest.rank{rank}.pt")), replica_0(single))
