"""Experiment trackers beside TensorBoard (ssl_imwa.trackers): the same evaluations as metrics.jsonl, the
run's config as parameters, the final metrics, one tracker run across a stop and a resume. MLflow is read
back through its real tracking API (a local SQLite store); W&B offline, from the run file it writes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.reference_runs import DISTRIBUTED, IMWA
from tests.utils import (
    logged_train_scalars,
    read_metrics,
    read_results,
    run_processes,
    train_run,
)

pytestmark = pytest.mark.slow


def _merged_history(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    return [(row["step"], row[metric]) for row in read_metrics(run_dir)
            if row["source"] == "merged" and row["split"] == "test"]


def _stopped_and_resumed(tmp_path: Path, logger: str) -> Path:
    overrides = [*IMWA, f"logger=[tensorboard,{logger}]"]
    train_run(tmp_path, [*overrides, "train.stop_at=13"], "run")
    return train_run(tmp_path, [*overrides, "resume=true"], "run")


def test_mlflow_holds_the_evaluations_config_and_final_metrics_of_one_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="pip install -e .[mlflow]")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trackers_test")
    run_dir = _stopped_and_resumed(tmp_path, "mlflow")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("trackers_test")
    (run,) = client.search_runs([experiment.experiment_id])   # the resume continued the same run
    assert run.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    for metric in ("balanced_acc", "top1"):
        logged = sorted((entry.step, entry.value) for entry in client.get_metric_history(run.info.run_id,
                                                                                           f"merged/test/{metric}"))
        assert logged == _merged_history(run_dir, metric)
    losses = client.get_metric_history(run.info.run_id, "replica1/train/loss")
    assert sorted(entry.step for entry in losses) == [5, 10, 15, 20]   # train.log_every=5, both episodes
    assert run.data.params["imwa.k"] == "2" and run.data.params["algorithm.name"] == "fixmatch"
    assert run.data.metrics["test/final_top1"] == read_results(run_dir)["final"]["top1"]


def test_mlflow_holds_the_replicas_of_every_process_of_a_torchrun_run_across_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process 1's replica is logged by process 0, which holds the MLflow run, at each merge; what
    process 1 logged before a stop between merges waits in its checkpoint."""
    pytest.importorskip("mlflow", reason="pip install -e .[mlflow]")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trackers_torchrun")
    run_dir = tmp_path / "run"
    for launch in (["train.stop_at=16"], ["resume=true"]):   # the stop: after replica 1 logged step 15
        finished = run_processes(2, [*DISTRIBUTED, "logger=[tensorboard,mlflow]", *launch], run_dir)
        assert all(code == 0 for code, _ in finished), "\n".join(output[-3000:] for _, output in finished)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("trackers_torchrun").experiment_id])
    for replica in (0, 1):
        losses = sorted((entry.step, entry.value)
                        for entry in client.get_metric_history(run.info.run_id, f"replica{replica}/train/loss"))
        assert [step for step, _ in losses] == [5, 10, 15, 20]   # train.log_every=5, written by process `replica`
        tensorboard = logged_train_scalars(run_dir / "tensorboard" / f"replica{replica}")["loss"]
        assert [value for _, value in losses] == pytest.approx(tensorboard, rel=1e-6)
        evaluations = sorted((entry.step, entry.value) for entry in
                             client.get_metric_history(run.info.run_id, f"replica{replica}/test/balanced_acc"))
        assert evaluations == [(row["step"], row["balanced_acc"]) for row in read_metrics(run_dir)
                               if row["source"] == "replica" and row["replica"] == replica and row["split"] == "test"]
        assert len(evaluations) == 4


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): LevelDB's log format (32 KiB blocks of
    checksummed chunks) after W&B's 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:   # the zero padding at a block's end
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):   # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_holds_the_evaluations_of_one_run_across_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="pip install -e .[wandb]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _stopped_and_resumed(tmp_path, "wandb")
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [path.name for path in files] == [f"run-{run_id}.wandb"] * 2, "the resume continued the same run"
    logged: dict[str, list[tuple[int, float]]] = {"balanced_acc": [], "top1": []}
    names = set()
    for path in files:
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                names.add(record.run.display_name)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for metric, values in logged.items():
                if f"merged/test/{metric}" in items:
                    values.append((items["merged/step"], items[f"merged/test/{metric}"]))
    assert names == {run_dir.name}
    for metric, values in logged.items():
        assert values == _merged_history(run_dir, metric)


def test_a_tracker_whose_package_is_missing_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ssl_imwa import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else real(name, *rest))
    with pytest.raises(ModuleNotFoundError, match=r"needs the wandb package, which is not installed: pip install -e "
                                                  r"\.\[wandb\]"):
        trackers.check_loggers(["tensorboard", "wandb"])
    with pytest.raises(ValueError, match="logger"):
        trackers.check_loggers(["comet"])
