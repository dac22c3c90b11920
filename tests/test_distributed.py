"""Several processes and several GPUs, checked on CPU: each process's device, objects that travel
between processes, one run directory, resume agreed by all processes, K a multiple of W.

GPUs are stood in for by fake CUDA tensors (`FakeTensorMode`) and by monkeypatched torch.cuda
queries; processes by gloo on localhost.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from ssl_imwa import distributed
from ssl_imwa.algorithm import get_algorithm
from ssl_imwa.checkpoint import read_checkpoint
from ssl_imwa.distributed import Communicator, init_process_layout, process_device
from ssl_imwa.merge import gather_algorithm_states, merge_optimizers_and_algorithms
from ssl_imwa.merges.uniform import uniform_merge
from tests.reference_runs import DISTRIBUTED, ReferenceRun
from tests.utils import (
    algorithm_context,
    assert_bitwise_equal,
    checkpoint_tensors,
    compose_config,
    free_port,
    launch_process,
    metrics_without_time,
    run_processes,
)

TINY = DISTRIBUTED


# ----- 1. the device of each process ---------------------------------------------------------
@pytest.mark.parametrize("requested, world, local_rank, gpus, expected", [
    ("cpu", 2, 1, 0, "cpu"),
    ("cuda", 1, 0, 2, "cuda:0"),
    ("cuda:1", 1, 0, 2, "cuda:1"),
    ("cuda", 2, 1, 2, "cuda:1"),
    ("cuda", 4, 3, 2, "cuda:1"),   # two nodes' worth of ranks on a 2-GPU node: LOCAL_RANK mod GPUs
    ("cuda", 2, 1, 1, "cuda:0"),   # a scheduler that shows each task only its own GPU
])
def test_each_process_takes_its_own_gpu(requested: str, world: int, local_rank: int, gpus: int,
                                        expected: str) -> None:
    assert process_device(requested, world, local_rank, gpus) == torch.device(expected)


def test_one_named_gpu_for_several_processes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"device='cuda:1' with 2 processes.*Use device=cuda"):
        process_device("cuda:1", 2, 0, 2)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        process_device("cuda", 1, 0, 0)


def test_the_process_gpu_is_current_before_anything_is_allocated_and_nccl_is_bound_to_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_imwa.builders import configure_torch
    from ssl_imwa.config import validate

    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(("deterministic", a)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = validate(compose_config(["experiment=quickstart", "device=cuda"]))
    device = configure_torch(cfg)
    assert device == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1))]   # and no deterministic kernels by default
    assert torch.backends.cudnn.benchmark is True

    joined: dict[str, Any] = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    layout = init_process_layout(device, 30.0)
    assert joined["backend"] == "nccl" and joined["device_id"] == torch.device("cuda", 1)
    assert layout.world.rank == 1 and layout.world.device == device
    assert layout.across_replicas is layout.world and layout.data_parallel.world_size == 1


def test_deterministic_true_on_cuda_turns_autotuning_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_imwa.builders import configure_torch
    from ssl_imwa.config import validate

    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    configure_torch(validate(compose_config(["experiment=quickstart", "device=cuda", "deterministic=true"])))
    assert torch.backends.cudnn.benchmark is False
    assert calls == [((True,), {"warn_only": True})]


# ----- 2. objects that travel between processes ----------------------------------------------
def _fake_peer(monkeypatch: pytest.MonkeyPatch, peer_device: str) -> None:
    """Stand in for a second process: what it sends comes back as pickling rebuilds it, CUDA
    tensors on the sender's GPU (`peer_device`) and CPU tensors on the CPU."""
    def as_sent_by_peer(obj: Any) -> Any:
        return tree_map_only(torch.Tensor, lambda t: t.to(peer_device) if t.is_cuda else t.clone(), obj)

    def all_gather_object(output: list[Any], obj: Any, group: Any = None) -> None:
        output[0], output[1] = obj, as_sent_by_peer(obj)

    def broadcast_object_list(box: list[Any], src: int, group: Any = None) -> None:
        box[0] = as_sent_by_peer(box[0])

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op, group=None: None)


def _devices(obj: Any) -> set[torch.device]:
    return {leaf.device for leaf in tree_flatten(obj)[0] if isinstance(leaf, torch.Tensor)}


@pytest.mark.parametrize("algorithm", ["daso", "acr"])
def test_merged_algorithm_states_come_back_on_the_local_gpu(monkeypatch: pytest.MonkeyPatch, algorithm: str) -> None:
    """Process 0 on GPU 0 merges with process 1 on GPU 1: before, the peer's state arrived on GPU 1."""
    from ssl_imwa.config import validate

    cfg = validate(compose_config(["experiment=quickstart", f"algorithm={algorithm}"]))
    _fake_peer(monkeypatch, "cuda:1")
    local = torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        instance = get_algorithm(algorithm)(cfg.algorithm, algorithm_context([50, 30, 20, 12, 8, 5, 4, 3, 2, 1], 100, local))
        states = gather_algorithm_states([(0, instance.state_dict())], Communicator(0, 2, device=local))
        assert len(states) == 2 and _devices(states) == {local}
        merged = instance.merge_states(states)
    assert _devices(merged) == {local}


def test_a_uniform_merge_seen_from_process_1_stays_on_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer buffers broadcast from process 0 arrive on this process's own GPU, not on process 0's."""
    _fake_peer(monkeypatch, "cuda:0")
    local = torch.device("cuda", 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3, device=local), torch.nn.BatchNorm1d(3, device=local))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        state = {"model": model.state_dict(), "teacher": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "algorithm": {"estimate": torch.zeros(3, device=local)}}
        comm = Communicator(1, 2, device=local)
        _, algorithm = merge_optimizers_and_algorithms([state], [1], "average", lambda states: states[0], 2, comm)
        result = uniform_merge([state], 2, comm)
    assert _devices(result.model) == _devices(result.teacher) == _devices(algorithm) == {local}


# ----- 5. K and W -------------------------------------------------------------------------------
def test_k_must_be_a_multiple_of_the_number_of_processes() -> None:
    assert Communicator(0, 2).local_replicas(4) == [0, 2] and Communicator(1, 2).local_replicas(4) == [1, 3]
    with pytest.raises(ValueError, match=r"imwa.k=3 is not a multiple of the number of processes \(2\)"):
        Communicator(1, 2).local_replicas(3)
    with pytest.raises(ValueError, match="imwa.k=1 is not a multiple"):
        Communicator(0, 2).local_replicas(1)


# ----- 3. one run directory, one console ---------------------------------------------------------
@pytest.mark.slow
def test_a_skewed_launch_writes_one_run_directory_and_only_process_0_prints(tmp_path: Path) -> None:
    """Process 1 starts 1.5 s after process 0: its clock names another `outputs/<date>/<time>`."""
    port = free_port()
    overrides = [*TINY, "train.iterations=10", "imwa.episodes=1"]
    first = launch_process(0, 2, port, overrides, None, cwd=tmp_path)
    time.sleep(1.5)
    second = launch_process(1, 2, port, overrides, None, cwd=tmp_path)
    outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    run_dirs = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    files = {path.name for path in (run_dirs[0] / "checkpoints").iterdir()}
    assert {"latest.rank0.pt", "latest.rank1.pt"} <= files
    assert "final test top1" in outputs[0] and "run dir" in outputs[0]
    assert "INFO" not in outputs[1] and "final test" not in outputs[1], outputs[1]
    assert "run dir" in (run_dirs[0] / "rank1.log").read_text()


# ----- 4. resume agreed by all processes ------------------------------------------------------------
def _run_two(overrides: list[str], run_dir: Path) -> list[str]:
    results = run_processes(2, overrides, run_dir)
    assert [code for code, _ in results] == [0, 0], "\n".join(output[-3000:] for _, output in results)
    return [output for _, output in results]


@pytest.mark.slow
def test_resume_when_the_processes_stopped_on_both_sides_of_a_merge(tmp_path: Path,
                                                                   reference_run: ReferenceRun) -> None:
    overrides = [*TINY, "train.iterations=30", "imwa.episodes=3"]   # merges after steps 10, 20, 30
    # The uninterrupted reference runs in one process: W=1 and W=2 give bitwise the same replicas (test_imwa).
    full, split = reference_run(overrides), tmp_path / "split"
    # Process 1 keeps a checkpoint from step 13 (episode 2) while process 0's is at step 23 (episode 3).
    _run_two([*overrides, "train.stop_at=13", "train.checkpoint_every=1"], split)
    step13 = (split / "checkpoints" / "latest.rank1.pt").read_bytes()
    _run_two([*overrides, "train.stop_at=23", "train.checkpoint_every=1", "resume=true"], split)
    (split / "checkpoints" / "latest.rank1.pt").write_bytes(step13)

    # Without process 0's checkpoint of merge 1 there is no common point: every process says why.
    broken = tmp_path / "broken"
    shutil.copytree(split, broken)
    (broken / "checkpoints" / "merge_001.rank0.pt").unlink()
    failed = run_processes(2, [*overrides, "resume=true"], broken)
    assert all(code != 0 for code, _ in failed)
    for _, output in failed:
        assert "cannot resume" in output and "merge_001.rank0.pt" in output, output[-3000:]

    outputs = _run_two([*overrides, "resume=true"], split)
    assert "resuming from" in outputs[0] and "merge_001.rank0.pt" in outputs[0]
    reference = checkpoint_tensors(full)
    for rank in range(2):
        own = {key.removeprefix(f"{rank}."): value for key, value in reference.items() if key.startswith(f"{rank}.")}
        spread = {key.removeprefix("0."): value for key, value in checkpoint_tensors(split, f"latest.rank{rank}.pt").items()}
        assert_bitwise_equal(own, spread)
    assert metrics_without_time(full) == metrics_without_time(split)


def test_hydra_overrides_that_protect_a_run_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    import main

    monkeypatch.setenv("RANK", "1")
    quiet = main._protective_overrides(["main.py", "imwa.k=2"])
    assert quiet[2:] == ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    assert main._protective_overrides(["main.py", "hydra.output_subdir=x"])[2:] == ["hydra/job_logging=disabled"]
    monkeypatch.setenv("RANK", "0")
    assert main._protective_overrides(["main.py", "imwa.k=2"]) == ["main.py", "imwa.k=2", "hydra.output_subdir=null"]
    assert main._protective_overrides(["main.py", "hydra.output_subdir=x"]) == ["main.py", "hydra.output_subdir=x"]
    assert main._protective_overrides(["main.py", "resume=true"])[2:] == ["hydra.output_subdir=null"]
    # next to the typed overrides, never after a flag that takes a value (Hydra would refuse it)
    assert main._protective_overrides(["main.py", "experiment=quickstart", "--cfg", "job"]) == [
        "main.py", "experiment=quickstart", "hydra.output_subdir=null", "--cfg", "job"]
    assert main._protective_overrides(["main.py", "--cfg", "job"]) == ["main.py", "--cfg", "job",
                                                                     "hydra.output_subdir=null"]


@pytest.mark.slow
def test_torchrun_teardown_stops_every_process_at_a_step_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGTERM to torchrun (what a scheduler sends) reaches every worker: each ends its step and writes
    a checkpoint there, and process 0 records 'stopped' with the signal, not 'running' for ever.
    (That such a run resumes bitwise: the resume tests here and in test_training.py.)"""
    import json
    import os
    import signal
    import subprocess
    import sys

    from tests.utils import ROOT

    run_dir = tmp_path / "run"
    long_run = [*TINY, "train.iterations=2000", "train.eval_every=1000", "train.checkpoint_every=1000"]
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "main.py"), *long_run, f"hydra.run.dir={run_dir}", "train.progress=false"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "tensorboard" / "replica1").is_dir() and time.monotonic() < deadline:  # training began
        assert agent.poll() is None, agent.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    agent.send_signal(signal.SIGTERM)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0, output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and "SIGTERM" in status["error"], (status, output[-3000:])
    for rank in range(2):
        payload = read_checkpoint(run_dir / "checkpoints" / f"latest.rank{rank}.pt")
        assert 0 < payload["progress"]["replica_steps"][rank] < 1000, "a checkpoint at the step the signal ended"


@pytest.mark.slow
def test_a_process_0_killed_outright_is_recorded_as_failed_by_the_process_that_outlives_it(tmp_path: Path) -> None:
    """torchrun, W=2, K=2, E=2: SIGKILL process 0 in episode 2. Process 0 records how a run ends, and
    here it cannot: process 1 finds its lock free and status.json still 'running', and records
    'failed', naming process 0."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from tests.utils import ROOT

    run_dir = tmp_path / "run"
    long_run = [*TINY, "train.iterations=400", "train.eval_every=200", "train.checkpoint_every=200",
                "imwa.episodes=2"]
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "main.py"), *long_run, f"hydra.run.dir={run_dir}", "train.progress=false"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "merge_001.rank0.pt").is_file():   # episode 2 began
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(0.5)
    process_0 = json.loads((run_dir / ".lock").read_text())["pid"]
    os.kill(process_0, signal.SIGKILL)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed", (status, output[-3000:])
    assert f"process 0 (pid {process_0} on " in status["error"] and "died without recording why" in status["error"]
