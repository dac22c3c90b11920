"""End-to-end behaviour of a training run: learning, determinism, exact resume, clear errors."""
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ssl_imwa.checkpoint import read_checkpoint
from tests.utils import (
    ROOT,
    assert_bitwise_equal,
    checkpoint_tensors,
    compose_config,
    read_metrics,
    read_results,
    train_run,
)

TINY = ["experiment=quickstart", "train.iterations=20", "train.eval_every=10", "train.batch_size=16", "train.mu=2",
        "train.log_every=5", "train.num_threads=1"]


def _without_times(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "time_s"} for record in records]


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "train.iterations=200", "train.num_threads=2"])
    results = read_results(run_dir)
    # 10 classes: chance is 0.1
    assert results["final"]["balanced_acc"] > 0.5, results["final"]
    assert results["best"] is None, "no validation split: best must not be chosen (never on test)"
    assert len(results["final"]["per_class"]) == 10
    assert (run_dir / "tensorboard" / "replica0").is_dir()
    assert results["split_counts"]["labeled"] == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]


@pytest.mark.slow
def test_same_seed_same_numbers_and_other_seed_differs(tmp_path: Path) -> None:
    first = checkpoint_tensors(train_run(tmp_path, TINY, "a"))
    second = checkpoint_tensors(train_run(tmp_path, TINY, "b"))
    assert_bitwise_equal(first, second)
    other = checkpoint_tensors(train_run(tmp_path, [*TINY, "seed=1"], "c"))
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = train_run(tmp_path, TINY, "full")
    with caplog.at_level(logging.INFO, logger="ssl_imwa"):
        stopped = train_run(tmp_path, [*TINY, "train.stop_at=13", "train.checkpoint_every=0"], "split")
    assert f"stopped at train.stop_at=13 with a checkpoint there; continue with: python main.py resume=true " \
           f"hydra.run.dir={stopped}" in caplog.text
    assert not (stopped / "results.json").exists()
    train_run(tmp_path, [*TINY, "resume=true"], "split")
    assert_bitwise_equal(checkpoint_tensors(full), checkpoint_tensors(stopped))
    assert _without_times(read_metrics(full)) == _without_times(read_metrics(stopped))
    assert read_results(full)["final"] == read_results(stopped)["final"]


@pytest.mark.slow
def test_best_is_selected_on_validation(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*TINY, "dataset.val_per_class=10", "dataset.m_max=60"])
    results = read_results(run_dir)
    vals = [r for r in read_metrics(run_dir) if r["split"] == "val" and r["source"] == "replica"]
    best_val = max(vals, key=lambda r: r["top1"])
    assert results["best"]["selected_on"] == "val"
    assert results["best"]["step"] == best_val["step"]
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*TINY, "train.stop_at=10"])
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="latest.pt is corrupt"):
        train_run(tmp_path, [*TINY, "resume=true"])


def test_mismatched_checkpoint_names_the_key(tmp_path: Path) -> None:
    train_run(tmp_path, [*TINY, "train.stop_at=10"])
    with pytest.raises(RuntimeError, match=r"cannot change \(start a new run to change them\): train.lr: run has 0.03, "
                                         r"command line has 0.1. A resume may change only device,"):
        train_run(tmp_path, [*TINY, "resume=true", "train.lr=0.1"])


@pytest.mark.slow
def test_a_resume_continues_the_run_as_recorded_without_retyping(tmp_path: Path) -> None:
    """Only `resume=true` and the launch settings are typed: the rest comes from the run's config.yaml."""
    original = [*TINY, "train.iterations=30", "train.eval_every=15", "seed=3", "train.lr=0.05"]
    full = train_run(tmp_path, original, "full")
    train_run(tmp_path, [*original, "train.stop_at=12"], "stopped")
    train_run(tmp_path, ["experiment=quickstart", "resume=true", "train.num_threads=1"], "stopped")
    assert_bitwise_equal(checkpoint_tensors(full), checkpoint_tensors(tmp_path / "stopped"))
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["status"] == "complete"
    with pytest.raises(RuntimeError, match=r"seed: run has 3, command line has 4"):
        train_run(tmp_path, ["experiment=quickstart", "resume=true", "seed=4"], "stopped")


@pytest.mark.slow
def test_a_resume_with_another_thread_count_says_so_and_records_both(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """CPU reductions split by thread count, so a resume on 2 threads of a 1-thread run is not bitwise
    the uninterrupted run: said at the resume, recorded in results.json."""
    train_run(tmp_path, [*TINY, "train.stop_at=13"])
    with caplog.at_level(logging.WARNING, logger="ssl_imwa"):
        train_run(tmp_path, ["experiment=quickstart", "resume=true", "train.num_threads=2"])
    assert "written with 1 CPU threads, this resume uses 2" in caplog.text
    assert "train.num_threads=1 continues it bitwise" in caplog.text
    assert read_results(tmp_path / "run")["cpu_threads"] == [1, 2]


def test_a_run_that_fails_before_training_records_why(tmp_path: Path) -> None:
    """Missing data is found after the run directory is claimed: status.json still says what failed,
    so a sweep's report can tell this job apart from one still running."""
    with pytest.raises(FileNotFoundError, match="/nonexistent/train not found"):
        train_run(tmp_path, [*TINY, "dataset=imagefolder", "dataset.root=/nonexistent"])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "/nonexistent/train not found" in status["error"]


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_run(tmp_path, [*TINY, "resume=true"])


def test_resume_with_another_number_of_processes_names_both(tmp_path: Path) -> None:
    """A run written by two processes has latest.rank0.pt and latest.rank1.pt, no latest.pt."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for rank in range(2):
        (checkpoints / f"latest.rank{rank}.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) \(2 replica group\(s\) of imwa.data_parallel=1\), this resume has 1.*torchrun --nproc_per_node=2"):
        train_run(tmp_path, [*TINY, "resume=true", "imwa.k=2"])


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from ssl_imwa.config import validate

    with pytest.raises(ValueError, match=r"^unknown key algorithm\.foo; algorithm has "):
        validate(compose_config([*TINY, "+algorithm.foo=1"]))
    with pytest.raises(ValueError, match=r"^unknown key algorithm\.treshold; did you mean algorithm\.threshold\?"):
        validate(compose_config([*TINY, "algorithm.treshold=0.9"]))
    with pytest.raises(ConfigCompositionException, match="train.lr=fast"):
        compose_config([*TINY, "train.lr=fast"])
    with pytest.raises(ValueError, match="train.schedule='linear'"):
        validate(compose_config([*TINY, "train.schedule=linear"]))
    with pytest.raises(KeyError, match="unknown algorithm 'nope'; registered: .*fixmatch"):
        validate(compose_config([*TINY, "algorithm.name=nope"]))
    with pytest.raises(ValueError, match="not divisible by imwa.episodes=3"):
        validate(compose_config([*TINY, "imwa.episodes=3"]))


def test_failed_plugin_import_is_an_error() -> None:
    from ssl_imwa.config import validate

    with pytest.raises(ImportError, match="no_such_plugin_module"):
        validate(compose_config([*TINY, "plugins=[no_such_plugin_module]"]))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train(tmp_path: Path, precision: str) -> None:
    fp32 = checkpoint_tensors(train_run(tmp_path, [*TINY, "train.iterations=6", "train.eval_every=6"], "fp32"))
    mixed_dir = train_run(tmp_path, [*TINY, "train.iterations=6", "train.eval_every=6",
                                     f"train.precision={precision}", "train.channels_last=true"], precision)
    mixed = checkpoint_tensors(mixed_dir)
    assert all(torch.isfinite(value).all() for value in mixed.values() if value.is_floating_point())
    # autocast really ran: the low-precision run's weights differ from the fp32 run's
    assert any(not torch.equal(fp32[key], mixed[key]) for key in fp32 if fp32[key].is_floating_point())
    if precision == "fp16":
        payload = read_checkpoint(mixed_dir / "checkpoints" / "latest.pt")
        assert payload["replicas"][0]["scaler"]["scale"] > 0  # the grad scaler's state is checkpointed


def test_a_config_error_is_recorded_in_the_run_directory(tmp_path: Path) -> None:
    import json

    with pytest.raises(ValueError, match="train.lr=-1.0"):
        train_run(tmp_path, [*TINY, "train.lr=-1"])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "train.lr=-1.0" in status["error"]


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """lr=1e6 diverges within a few steps; before, latest.pt then held non-finite weights."""
    overrides = [*TINY, "train.lr=1e6", "train.checkpoint_every=1", "train.eval_every=10"]
    with pytest.raises(FloatingPointError, match=r"replica 0, episode 1: .* not finite") as error:
        train_run(tmp_path, overrides)
    reported = [int(step) for step in re.findall(r"step (\d+)", str(error.value))]
    payload = read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    saved_step = payload["progress"]["replica_steps"][0]
    assert saved_step < min(reported), (saved_step, str(error.value))
    assert all(tensor.isfinite().all() for tensor in checkpoint_tensors(tmp_path / "run").values()
               if tensor.is_floating_point())
    logged = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
    assert all(math.isfinite(row["top1"]) for row in logged)


@pytest.mark.slow
def test_a_refused_resume_leaves_a_finished_run_as_it_was(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, TINY)
    record = {name: (run_dir / name).read_text() for name in ("config.yaml", "status.json", "results.json")}
    with pytest.raises(ValueError, match="train.log_every=0"):     # a launch key, checked by validation
        train_run(tmp_path, [*TINY, "resume=true", "train.log_every=0"])
    with pytest.raises(RuntimeError, match="train.iterations: run has 20, command line has 40"):
        train_run(tmp_path, [*TINY, "resume=true", "train.iterations=40"])
    assert {name: (run_dir / name).read_text() for name in record} == record


STOPPED_PLUGIN = """
import os
import signal
from ssl_imwa.algorithms.fixmatch import FixMatch
from ssl_imwa.algorithm import register_algorithm

@register_algorithm("signalled_at_step_3")
class SignalledAtStep3(FixMatch):
    def losses(self, batch, model, teacher, step):
        if step == 3 and os.environ.get("SSL_IMWA_TEST_SIGNAL"):
            os.kill(os.getpid(), getattr(signal, os.environ["SSL_IMWA_TEST_SIGNAL"]))
        return super().losses(batch, model, teacher, step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_current_step_with_a_checkpoint_and_resume_finishes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_name: str) -> None:
    """A scheduler's SIGTERM or a Ctrl-C during step 4 (index 3): the step ends, a checkpoint is written
    at it (not only at the last periodic one, step 2), the status says 'stopped', and the resume
    reaches the uninterrupted result bitwise."""
    from ssl_imwa.stopping import Terminated

    (tmp_path / "stopped_plugin.py").write_text(STOPPED_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [*TINY, "plugins=[stopped_plugin]", "algorithm.name=signalled_at_step_3",
                 "train.checkpoint_every=2"]
    full = train_run(tmp_path, overrides, "full")
    monkeypatch.setenv("SSL_IMWA_TEST_SIGNAL", signal_name)
    with pytest.raises(Terminated, match=rf"stopped by {signal_name} after step 4 of replica 0, with a checkpoint "
                                         r"there; continue with: python main.py resume=true hydra.run.dir=") as caught:
        train_run(tmp_path, overrides)
    assert caught.value.code == 128 + getattr(signal, signal_name), "a stop is neither success (0) nor failure (1)"
    monkeypatch.delenv("SSL_IMWA_TEST_SIGNAL")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "stopped" and signal_name in status["error"]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["progress"][
        "replica_steps"] == {0: 4}
    # A kill during a checkpoint write leaves a temporary file: the resume removes it.
    stale = tmp_path / "run" / "checkpoints" / "latest.pt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    train_run(tmp_path, [*overrides, "resume=true"])
    assert not stale.exists()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "complete"
    assert_bitwise_equal(checkpoint_tensors(full), checkpoint_tensors(tmp_path / "run"))


@pytest.mark.slow
def test_a_stopped_run_exits_with_the_shell_code_of_its_signal_logs_how_to_continue_and_reports_why(
        tmp_path: Path) -> None:
    (tmp_path / "stopped_plugin.py").write_text(STOPPED_PLUGIN)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *TINY, "plugins=[stopped_plugin]", "algorithm.name=signalled_at_step_3",
         f"hydra.run.dir={run_dir}", "train.progress=false"], capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "SSL_IMWA_TEST_SIGNAL": "SIGINT"})
    assert result.returncode == 130, result.stderr[-3000:]
    line = f"continue with: python main.py resume=true hydra.run.dir={run_dir}"
    assert line in result.stdout + result.stderr and line in (run_dir / "main.log").read_text()
    report = subprocess.run([sys.executable, "-m", "ssl_imwa.report", str(run_dir), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    said = report.stdout + (tmp_path / "report" / "report.md").read_text()
    assert "stopped by SIGINT" in said and "train.stop_at" not in said, said
