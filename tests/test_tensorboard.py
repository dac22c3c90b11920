"""TensorBoard's HParams tab, read back through TensorBoard's own hparams plugin backend.

A sweep of FixMatch/ACR x K=1/K=2 must show its swept keys as differing, with both values, next
to the final, best and median-of-last metrics; run names must start with what tells runs apart.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
    metadata,
)

from ssl_imwa import report
from ssl_imwa.confusion_image import BLUE_END, WHITE_END, confusion_image
from ssl_imwa.run_logger import RunLogger, command_line_hparams
from ssl_imwa.tensorboard_hparams import METRICS, _write_events
from tests.utils import train_run

METRIC_TAGS = [tag for tag, _, _ in METRICS]


@dataclass
class HParamsTab:
    """What the HParams tab is served: the runs, the experiment (declared or inferred), the trials."""

    runs: list[str]
    experiment_tag_runs: list[str]
    experiment: Any  # api_pb2.Experiment
    groups: dict[str, Any]  # trial id -> api_pb2.SessionGroup
    scalar_tags: dict[str, list[str]]

    def hparam(self, name: str) -> Any:
        return next(info for info in self.experiment.hparam_infos if info.name == name)

    def metric_values(self, trial: str) -> dict[str, float]:
        return {value.name.tag: value.value for value in self.groups[trial].metric_values}


def hparams_tab(logdir: Path) -> HParamsTab:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                                                            data_provider=provider))
    request = tb_context.RequestContext()
    # what the dashboard asks for (it sends hparamsLimit 1000)
    experiment = get_experiment.Handler(request, context, "", api_pb2.GetExperimentRequest(
        include_metrics=True, hparams_limit=1000)).run()
    columns = [api_pb2.ColParams(hparam=info.name) for info in experiment.hparam_infos]
    columns += [api_pb2.ColParams(metric=info.name) for info in experiment.metric_infos]
    groups = list_session_groups.Handler(request, context, "", api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, col_params=columns, allowed_statuses=[0, 1, 2, 3])).run()
    plugin_tags = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    return HParamsTab(
        runs=sorted(multiplexer.Runs()),
        experiment_tag_runs=[run for run, tags in plugin_tags.items() if metadata.EXPERIMENT_TAG in tags],
        experiment=experiment,
        groups={group.name: group for group in groups.session_groups},
        scalar_tags={run: sorted(tags) for run, tags in multiplexer.PluginRunToTagToContent("scalars").items()},
    )


# --------------------------------------------------------------------------- one run's session


RECIPE = {"algorithm": "fixmatch", "dataset": "digits", "seed": 0, "imwa.k": 1, "train.lr": 0.03}


def _fake_run(root: Path, algorithm: str, k: int, seed: int = 0) -> Path:
    """A run directory as Hydra's multirun leaves it: config.yaml and .hydra/overrides.yaml."""
    run_dir = root / f"algorithm={algorithm},imwa.k={k},seed={seed}"
    (run_dir / ".hydra").mkdir(parents=True)
    # ACR's preset also changes the split protocol, as configs/algorithm/acr.yaml does
    config = {"seed": seed, "device": "cpu", "algorithm": {"name": algorithm, "threshold": 0.95},
              "dataset": {"protocol": "nested" if algorithm == "acr" else "disjoint"},
              "imwa": {"k": k, "episodes": 1}, "train": {"lr": 0.03, "progress": False}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"algorithm={algorithm}", f"imwa.k={k}", f"seed={seed}", "train.progress=false", "device=cpu"]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run_dir


def _results(top1: float, best: float | None) -> dict[str, Any]:
    final = {"top1": top1, "balanced_acc": top1 - 0.1, "step": 400}
    return {"final": final, "best": None if best is None else {"top1": best, "balanced_acc": best - 0.1},
            "median_last20": {"top1": top1 - 0.01, "balanced_acc": top1 - 0.11}}


def _log_session(run_dir: Path, top1: float, best: float | None, k: int) -> None:
    """What ssl_imwa.run does at the end of a complete run."""
    logger = RunLogger(run_dir, ["a", "b"])
    results = _results(top1, best)
    logger.results(results)
    logger.hparams({**RECIPE, "imwa.k": k}, {"final_top1": top1, "final_balanced_acc": top1 - 0.1})
    logger.close()


def test_command_line_keys_take_their_typed_values(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path, "acr", 2, seed=3)
    # bookkeeping (train.progress, device) is left out; imwa.k is the number from config.yaml
    assert command_line_hparams(run_dir) == {"algorithm": "acr", "imwa.k": 2, "seed": 3}
    assert command_line_hparams(tmp_path) == {}  # no Hydra record


def test_runs_write_sessions_whose_swept_key_differs(tmp_path: Path) -> None:
    """A run's session names every swept hparam with its own value, so TensorBoard, which takes one
    experiment declaration for all runs, marks the swept key as differing and shows it."""
    for k, top1, best in ((1, 0.70, None), (2, 0.75, 0.80)):
        _log_session(_fake_run(tmp_path, "fixmatch", k), top1, best, k)
    tab = hparams_tab(tmp_path)
    assert tab.experiment_tag_runs == []  # inferred from the sessions, so `differs` is computed
    k = tab.hparam("imwa.k")
    assert k.differs and (k.domain_interval.min_value, k.domain_interval.max_value) == (1.0, 2.0)
    assert not tab.hparam("algorithm").differs
    assert tab.experiment.hparam_infos[0].name == "imwa.k"  # differing first: the tab shows it
    assert {"device", "train.progress"}.isdisjoint(info.name for info in tab.experiment.hparam_infos)
    assert {info.name.tag for info in tab.experiment.metric_infos} == set(METRIC_TAGS)
    trial = "algorithm=fixmatch,imwa.k=2,seed=0"
    assert tab.metric_values(trial) == pytest.approx({
        "test/final_top1": 0.75, "test/final_balanced_acc": 0.65, "test/best_top1": 0.80,
        "test/best_balanced_acc": 0.70, "test/median_last20_top1": 0.74, "test/median_last20_balanced_acc": 0.64})
    assert "test/best_top1" not in tab.metric_values("algorithm=fixmatch,imwa.k=1,seed=0")  # no val split
    assert all(value.training_step == 400 for value in tab.groups[trial].metric_values)
    # no `hparam/*` section on the Scalars page
    assert not any(tag.startswith("hparam") for tags in tab.scalar_tags.values() for tag in tags)


@pytest.mark.slow
def test_a_trained_run_writes_its_session(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "train.iterations=8", "train.eval_every=4",
                                   "train.batch_size=8", "train.mu=1", "train.num_threads=1"])
    tab = hparams_tab(run_dir / "tensorboard")
    results = json.loads((run_dir / "results.json").read_text())
    assert tab.experiment_tag_runs == []
    assert list(tab.groups) == ["run"]  # the run directory's name
    values = tab.metric_values("run")
    assert values["test/final_top1"] == pytest.approx(results["final"]["top1"])
    assert values["test/median_last20_top1"] == pytest.approx(results["median_last20"]["top1"])
    assert tab.groups["run"].hparams["imwa.k"].number_value == 1
    assert not any(tag.startswith("hparam") for tags in tab.scalar_tags.values() for tag in tags)


# --------------------------------------------------------------------------- the report's view


def _write_stream(directory: Path, tag: str, values: list[float]) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    _write_events(directory, [(100 * (index + 1), Summary(value=[Summary.Value(tag=tag, simple_value=value)]))
                              for index, value in enumerate(values)])


@pytest.fixture
def four_run_sweep(tmp_path: Path) -> Path:
    """FixMatch/ACR x K=1/K=2, complete runs with their TensorBoard streams, plus a crashed one."""
    root = tmp_path / "multirun" / "10-00-00"
    for algorithm, k, top1 in (("fixmatch", 1, 0.60), ("fixmatch", 2, 0.64), ("acr", 1, 0.70), ("acr", 2, 0.74)):
        run_dir = _fake_run(root, algorithm, k)
        (run_dir / "results.json").write_text(json.dumps({**_results(top1, None), "status": "complete"}))
        (run_dir / "metrics.jsonl").write_text(json.dumps({
            "step": 400, "split": "test", "source": "merged" if k > 1 else "replica", "replica": 0,
            "top1": top1, "balanced_acc": top1 - 0.1}) + "\n")
        for stream in ("replica0", "merged", "hparams"):
            _write_stream(run_dir / "tensorboard" / stream, "test/top1", [top1 - 0.1, top1])
    crashed = _fake_run(root, "acr", 4)
    (crashed / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    return root


def test_report_view_declares_the_swept_keys_with_both_values(four_run_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    with contextlib.redirect_stdout(None):
        assert report.main([str(four_run_sweep), "--out", str(out), "--tensorboard"]) == 0
    tab = hparams_tab(out / "tensorboard")
    # the declaration sits in the first run's session: no extra run `.` that holds nothing else
    assert tab.experiment_tag_runs == ["acr,K=1,seed=0"] and "." not in tab.runs
    declared = [info.name for info in tab.experiment.hparam_infos]
    # the swept keys and the key ACR's preset changes, flagged, so the tab shows them
    assert declared[:3] == ["algorithm.name", "dataset.protocol", "imwa.k"]
    assert tab.hparam("dataset.protocol").differs
    k = tab.hparam("imwa.k")
    assert k.differs and list(k.domain_discrete) == [1.0, 2.0, 4.0]
    assert k.type == api_pb2.DATA_TYPE_FLOAT64
    algorithm = tab.hparam("algorithm.name")
    assert algorithm.differs and list(algorithm.domain_discrete) == ["acr", "fixmatch"]
    assert not tab.hparam("seed").differs and not tab.hparam("train.lr").differs
    assert "algorithm.threshold" not in declared
    # no run has a validation split: no best_* columns that every run leaves empty
    assert [(info.name.tag, info.display_name) for info in tab.experiment.metric_infos] == [
        (tag, name) for tag, name, _ in METRICS if "/best_" not in tag]
    # short trial ids: the fewest keys that tell the runs apart (protocol follows the algorithm)
    assert sorted(tab.groups) == ["acr,K=1,seed=0", "acr,K=2,seed=0", "acr,K=4,seed=0", "fixmatch,K=1,seed=0",
                                  "fixmatch,K=2,seed=0"]
    assert tab.metric_values("acr,K=2,seed=0") == pytest.approx({
        "test/final_top1": 0.74, "test/final_balanced_acc": 0.64, "test/median_last20_top1": 0.73,
        "test/median_last20_balanced_acc": 0.63})
    assert tab.groups["acr,K=2,seed=0"].hparams["imwa.k"].number_value == 2
    crashed = tab.groups["acr,K=4,seed=0"]
    assert crashed.sessions[0].status == api_pb2.STATUS_FAILURE and not crashed.metric_values
    # the runs' curves, linked under the short names; the runs' own sessions are not doubled
    assert "fixmatch,K=2,seed=0/merged" in tab.runs
    assert "fixmatch,K=2,seed=0/replica0" in tab.runs
    assert not any(run.endswith("/hparams") for run in tab.runs)
    assert tab.scalar_tags["fixmatch,K=2,seed=0/merged"] == ["test/top1"]


def test_report_view_is_rebuilt_not_added_to(four_run_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    subset = str(four_run_sweep / "algorithm=acr,imwa.k=[12],seed=0")
    with contextlib.redirect_stdout(None):
        report.main([str(four_run_sweep), "--out", str(out), "--tensorboard"])
        report.main([subset, "--out", str(out), "--tensorboard"])
    tab = hparams_tab(out / "tensorboard")
    assert sorted(tab.groups) == ["K=1,seed=0", "K=2,seed=0"]
    assert tab.experiment.hparam_infos[0].name == "imwa.k"
    # the runs the links pointed to are untouched
    assert (four_run_sweep / "algorithm=fixmatch,imwa.k=2,seed=0" / "tensorboard" / "merged").is_dir()


def test_report_view_declares_best_metrics_when_a_run_has_them(four_run_sweep: Path, tmp_path: Path) -> None:
    run_dir = four_run_sweep / "algorithm=acr,imwa.k=2,seed=0"
    (run_dir / "results.json").write_text(json.dumps({**_results(0.74, 0.8), "status": "complete"}))
    with contextlib.redirect_stdout(None):
        assert report.main([str(four_run_sweep), "--out", str(tmp_path / "report"), "--tensorboard"]) == 0
    tab = hparams_tab(tmp_path / "report" / "tensorboard")
    assert [info.name.tag for info in tab.experiment.metric_infos] == METRIC_TAGS
    assert tab.metric_values("acr,K=2,seed=0")["test/best_top1"] == pytest.approx(0.8)
    assert "." not in tab.runs


def test_a_sweeps_trials_are_named_by_the_keys_it_varies(tmp_path: Path) -> None:
    """Trial ids were the job directories' names: every override of the sweep, constant ones too
    (`algorithm=fixmatch,experiment=quickstart,imwa.k=2,seed=0,train.iterations=200`)."""
    sweep = tmp_path / "multirun" / "2024-06-01" / "10-00-00"
    # what Hydra writes into the sweep directory before the first job: the command's overrides
    record = {"hydra": {"mode": "MULTIRUN", "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": [
        "algorithm=fixmatch", "imwa.k=1,2", "seed=0", "train.progress=false", "device=cpu"]}}}
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))
    for k, top1 in ((1, 0.70), (2, 0.75)):
        _log_session(_fake_run(sweep, "fixmatch", k), top1, None, k)
    tab = hparams_tab(sweep)
    assert sorted(tab.groups) == ["imwa.k=1", "imwa.k=2"]
    assert tab.metric_values("imwa.k=2")["test/final_top1"] == pytest.approx(0.75)
    assert tab.groups["imwa.k=2"].hparams["algorithm"].string_value == "fixmatch"  # constant keys: columns
    # a run outside a sweep (or with no readable record) keeps its directory's name
    (sweep / "multirun.yaml").write_text("hydra: [unclosed\n")
    lone = tmp_path / "lone"
    _log_session(_fake_run(lone, "acr", 2), 0.6, None, 2)
    assert list(hparams_tab(lone).groups) == ["algorithm=acr,imwa.k=2,seed=0"]


@pytest.mark.slow
def test_k1_merged_stream_holds_the_runs_model_after_each_episode(tmp_path: Path) -> None:
    """With K=1 the `merged` stream held only `merge/seconds` (always 0), although the docs say it
    holds the evaluation tags of the run's model after each episode (for K=1, replica 0's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_run(tmp_path, ["experiment=quickstart", "train.iterations=8", "train.eval_every=2",
                                   "imwa.episodes=2", "train.batch_size=8", "train.mu=1", "train.num_threads=1"])
    streams = {}
    for name in ("merged", "replica0"):
        events = EventAccumulator(str(run_dir / "tensorboard" / name), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        streams[name] = events
    merged, replica = streams["merged"], streams["replica0"]
    tags = merged.Tags()
    assert "merge/seconds" not in tags["scalars"]
    evaluation_tags = {tag for tag in replica.Tags()["scalars"] if not tag.startswith("train/")}
    assert set(tags["scalars"]) == evaluation_tags and "test/balanced_acc" in evaluation_tags
    for tag in ("test/top1", "test/balanced_acc"):
        at_episode_ends = [(event.step, event.value) for event in replica.Scalars(tag) if event.step in (4, 8)]
        assert [(event.step, event.value) for event in merged.Scalars(tag)] == at_episode_ends
    assert [image.step for image in merged.Images("test/confusion")] == [4, 8]
    results = json.loads((run_dir / "results.json").read_text())
    assert merged.Scalars("test/top1")[-1].value == pytest.approx(results["final"]["top1"])


def _pixels_of(image: np.ndarray, colour: np.ndarray) -> int:
    return int((image == colour).all(axis=-1).sum())


def test_the_confusion_image_colours_each_cell_by_its_share_of_the_true_class() -> None:
    """25 classes (no text in the cells): 3 of class i's images predicted i, 1 predicted i+1. Every
    cell is a square of 480 // 25 = 19 pixels in the colour of its share, the rest of the image white."""
    classes = 25
    matrix = [[3 if column == row else 1 if column == (row + 1) % classes else 0 for column in range(classes)]
              for row in range(classes)]
    image = confusion_image(matrix, [f"class {index}" for index in range(classes)])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    colour = lambda share: (WHITE_END + share * (BLUE_END - WHITE_END)).round()
    cell_pixels = 19 * 19
    assert _pixels_of(image, colour(0.75)) == classes * cell_pixels
    assert _pixels_of(image, colour(0.25)) == classes * cell_pixels
    assert _pixels_of(image, colour(0.0)) == (classes * classes - 2 * classes) * cell_pixels


def test_the_confusion_image_names_the_classes() -> None:
    matrix = [[5, 0], [2, 3]]
    short, long = confusion_image(matrix, ["a", "b"]), confusion_image(matrix, ["a", "a much longer name"])
    assert long.shape[0] > short.shape[0] and long.shape[1] > short.shape[1]   # names left of and below the grid
    assert _pixels_of(short, BLUE_END) > 0   # class a's cell: all of its images predicted a, share 1
