"""Test helpers: compose the real config (same files and schema as main.py) and train in a temp dir."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ssl_imwa import composition
from ssl_imwa.algorithm import AlgorithmContext
from ssl_imwa.checkpoint import read_checkpoint, replica_tensors
from ssl_imwa.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = composition.CONFIG_DIR
register_configs()


def compose_config(overrides: list[str], run_dir: Path | str = ".") -> DictConfig:
    """The package's composition (ssl_imwa.composition), without the progress bar."""
    return composition.compose_config([*overrides, "train.progress=false"], run_dir)


def algorithm_context(labeled_counts: list[int], total_steps: int, device: torch.device | str = "cpu"
                      ) -> AlgorithmContext:
    """The context of an algorithm built by hand (the built-ins do not read the unlabeled set's size)."""
    return AlgorithmContext(tuple(labeled_counts), total_steps, num_unlabeled=7 * sum(labeled_counts), device=device)


def train_run(tmp_path: Path, overrides: list[str], name: str = "run") -> Path:
    """Train with `overrides` into tmp_path/name and return the run directory."""
    from ssl_imwa.run import run

    run_dir = tmp_path / name
    run(compose_config(overrides, run_dir), overrides)
    return run_dir


def read_results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(run_dir: Path, name: str = "latest.pt") -> dict[str, torch.Tensor]:
    """Every replica's student, teacher and optimiser tensors, flattened, for bitwise comparisons."""
    return replica_tensors(read_checkpoint(Path(run_dir) / "checkpoints" / name))


def assert_bitwise_equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert torch.equal(value, right[key]), f"{key} differs"


def metrics_without_time(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows without their wall-clock field: what two runs that computed the same share."""
    return [{key: value for key, value in row.items() if key != "time_s"} for row in read_metrics(run_dir)]


def assert_same_run(expected: Path, actual: Path, what: str = "", checkpoint: str = "latest.pt") -> None:
    """Two runs ended the same: the checkpoints' tensors bitwise, and every evaluation but its wall time."""
    assert_bitwise_equal(checkpoint_tensors(expected, checkpoint), checkpoint_tensors(actual, checkpoint))
    assert metrics_without_time(expected) == metrics_without_time(actual), what


def assert_same_state(left: dict[str, Any], right: dict[str, Any], what: str) -> None:
    """Two state dicts (an algorithm's: tensors and plain values) hold the same keys and bitwise values."""
    assert left.keys() == right.keys(), what
    for key, value in left.items():
        same = torch.equal(value, right[key]) if isinstance(value, torch.Tensor) else value == right[key]
        assert same, f"{what}: {key} differs"


def checkpoint_algorithm_state(run_dir: Path, replica: int = 0) -> dict[str, torch.Tensor]:
    payload = read_checkpoint(run_dir / "checkpoints" / "latest.pt")
    return {key: torch.as_tensor(value) for key, value in payload["replicas"][replica]["algorithm"].items()}


def resumed_bitwise(tmp_path: Path, overrides: list[str], stop_at: int, replicas: int) -> Path:
    """Train `overrides` uninterrupted and again stopped at `stop_at` then resumed; assert the two end
    bitwise equal (weights, optimisers and every replica's algorithm state); return the resumed run."""
    uninterrupted = train_run(tmp_path, overrides, "uninterrupted")
    train_run(tmp_path, [*overrides, f"train.stop_at={stop_at}"], "resumed")
    resumed = train_run(tmp_path, [*overrides, "resume=true"], "resumed")
    assert_bitwise_equal(checkpoint_tensors(uninterrupted), checkpoint_tensors(resumed))
    for replica in range(replicas):
        assert_bitwise_equal(checkpoint_algorithm_state(uninterrupted, replica),
                             checkpoint_algorithm_state(resumed, replica))
    return resumed


def logged_train_scalars(event_dir: Path) -> dict[str, list[float]]:
    """A replica's logged training scalars, by name, in step order (from its TensorBoard stream)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag.removeprefix("train/"): [event.value for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith("train/")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_process(rank: int, world: int, port: int, overrides: list[str], run_dir: Path | None,
                   extra_path: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    """Start one process of a W-process run, as torchrun would (same environment variables).

    `run_dir` None leaves the run directory to Hydra (`outputs/<date>/<time>` under `cwd`).
    """
    python_path = os.pathsep.join(str(path) for path in (extra_path, ROOT) if path is not None)
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": python_path}
    where = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *overrides, *where, "train.progress=false"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_processes(world: int, overrides: list[str], run_dir: Path | None, timeout: float = 300,
                  **options: object) -> list[tuple[int, str]]:
    """Run a W-process job to its end; (return code, output) per rank."""
    port = free_port()
    processes = [launch_process(rank, world, port, overrides, run_dir, **options) for rank in range(world)]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        results.append((process.returncode, output))
    return results


def launch_jobs(world: int, jobs: list[list[str]], timeout: float = 400) -> None:
    """Run `jobs` (override lists, each with run_dir=...) in one `world`-process job, as torchrun would."""
    payload = json.dumps([{"port": free_port(), "overrides": overrides} for overrides in jobs])
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "data_parallel_worker.py"), payload],
                                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(output[-3000:] for output in outputs)
