"""SIGKILL at a random moment, then resume: bitwise the uninterrupted run.

The kill points are drawn from a seed (`SSL_IMWA_KILL_SEED`, else the day's number), so each CI day
tries a different one (`SSL_IMWA_KILL_DRAWS=N` for more); the test id names the draw, and the seed
reproduces it. A kill lands either at the start of a training step (the n-th step of the run,
counting every replica's) or halfway through writing the n-th checkpoint.
"""
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reference_runs import ALGORITHMS, IMWA, TINY, ReferenceRun
from tests.utils import (
    ROOT,
    assert_same_run,
    metrics_without_time,
    train_run,
)

TWA = ["imwa.merge=twa", "dataset.val_per_class=10", "dataset.m_max=60", "imwa.twa.steps=10",
       "imwa.twa.batch_size=32", "imwa.twa.include_start=true", "imwa.twa.accept=false"]
CONFIGS = {
    **{name: [*TINY, *options] for name, options in ALGORITHMS.items()},
    "imwa_uniform": IMWA,
    "imwa_twa": [*IMWA, *TWA],
}
DRAWS_PER_RUN = int(os.environ.get("SSL_IMWA_KILL_DRAWS", "4"))  # each a fresh kill point of the day's seed
SEED = int(os.environ.get("SSL_IMWA_KILL_SEED", int(time.time()) // 86400))

KILL_PLUGIN = '''
"""Kills this process (SIGKILL) where SSL_IMWA_KILL says: "step:<n>", "write:<n>" or "pass:<n>" (inside the
n-th pass over the unlabeled set of a generation's end); inert without it."""
import io
import os
import signal

import torch

from ssl_imwa.trainer import Trainer

plan = os.environ.get("SSL_IMWA_KILL")
if plan:
    kind, count = plan.split(":")
    remaining = [int(count)]

    def due() -> bool:
        remaining[0] -= 1
        return remaining[0] == 0

    if kind == "step":
        real_step = Trainer.step

        def step(self, replica, at):
            if due():
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, replica, at)

        Trainer.step = step
    elif kind == "pass":
        real_predict = Trainer.predict_unlabeled

        def predict_unlabeled(self, model, stream):
            outputs = real_predict(self, model, stream)
            if due():
                os.kill(os.getpid(), signal.SIGKILL)
            return outputs

        Trainer.predict_unlabeled = predict_unlabeled
    else:
        real_save = torch.save

        def save(obj, stream, *args, **kwargs):
            if not due():
                return real_save(obj, stream, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
'''


def _draws() -> list[tuple[str, str, int]]:
    """(config, kill kind, n) for this run's seed."""
    rng = random.Random(SEED)
    draws = []
    for _ in range(DRAWS_PER_RUN):
        config = rng.choice(sorted(CONFIGS))
        steps = 40 if config.startswith(("imwa", "crest")) else 20   # CReST's: two generations of 20
        kind = rng.choice(["step", "write"])
        draws.append((config, kind, rng.randint(2, steps - 1) if kind == "step" else rng.randint(1, 6)))
    return draws


@pytest.mark.slow
@pytest.mark.parametrize("config, kind, count", _draws(), ids=lambda value: str(value))
def test_a_kill_anywhere_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             reference_run: ReferenceRun,
                                                             config: str, kind: str, count: int) -> None:
    """The uninterrupted run is the shared reference, trained without the plugin and checkpointing at
    its default interval: neither may change a number."""
    draw = f"{config}, kill at {kind} {count} (SSL_IMWA_KILL_SEED={SEED})"
    (tmp_path / "kill_plugin.py").write_text(KILL_PLUGIN)
    overrides = [*CONFIGS[config], "train.checkpoint_every=3", "plugins=[kill_plugin]"]
    monkeypatch.syspath_prepend(str(tmp_path))
    full = reference_run(CONFIGS[config])
    killed = tmp_path / "killed"
    kill_and_resume(tmp_path, overrides, f"{kind}:{count}", draw)
    assert_same_run(full, killed, draw)


def kill_and_resume(tmp_path: Path, overrides: list[str], plan: str, draw: str) -> None:
    """Run `overrides` into tmp_path/killed under the kill plugin's `plan`, then resume it to the end."""
    env = {**os.environ, "SSL_IMWA_KILL": plan, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={tmp_path / 'killed'}",
                             "train.progress=false"], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == -signal.SIGKILL, f"{draw}: the run was not killed\n{result.stderr[-2000:]}"
    # A kill before the first checkpoint leaves nothing to restore: the resume starts the run again.
    train_run(tmp_path, [*overrides, "resume=true"], "killed")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["crest_plus"])   # CReST's boundary is the same, without the estimate
def test_a_kill_inside_the_pass_that_ends_a_generation_resumes_to_the_uninterrupted_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_run: ReferenceRun, algorithm: str) -> None:
    """SIGKILL after the merged teacher's pass over the unlabeled set, before its picks reach any checkpoint:
    the resume redoes the merge and the pass, and the next generation learns from the same picks (and the
    alignment estimate the merge gave it)."""
    (tmp_path / "kill_plugin.py").write_text(KILL_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [*IMWA, *ALGORITHMS[algorithm]]
    full = reference_run(overrides)
    kill_and_resume(tmp_path, [*overrides, "plugins=[kill_plugin]"], "pass:1", f"{algorithm}, kill in the pass")
    assert_same_run(full, tmp_path / "killed", f"{algorithm}, killed in the pass")


HISTORY = ["experiment=quickstart", "train.iterations=40", "train.eval_every=10", "train.batch_size=16", "train.mu=2",
           "train.num_threads=1"]


@pytest.mark.slow
def test_a_resume_rewrites_metrics_jsonl_from_the_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """metrics.jsonl cut in the middle of its last line, or deleted, before a resume: the rows up to the
    checkpoint come back from it, byte for byte, and the run ends with every row of an uninterrupted one
    (before, the next row was appended to the half line, or only the rows after the resume remained)."""
    import shutil

    full = train_run(tmp_path, HISTORY, "full")
    stopped = train_run(tmp_path, [*HISTORY, "train.stop_at=20"], "stopped")
    written = (stopped / "metrics.jsonl").read_bytes()
    assert written.count(b"\n") == 2
    for damage in ("torn", "deleted"):
        run_dir = tmp_path / damage
        shutil.copytree(stopped, run_dir)
        if damage == "torn":
            (run_dir / "metrics.jsonl").write_bytes(written[: len(written) - len(written.splitlines()[-1]) // 2])
        else:
            (run_dir / "metrics.jsonl").unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssl_imwa"):
            train_run(tmp_path, [*HISTORY, "resume=true"], damage)
        said = "was damaged or incomplete" if damage == "torn" else "was missing"
        assert f"metrics.jsonl {said}: rewrote its 2 evaluations" in caplog.text, damage
        rewritten = (run_dir / "metrics.jsonl").read_bytes()
        assert rewritten.startswith(written), damage
        assert metrics_without_time(run_dir) == metrics_without_time(full), damage


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_gone_is_not_started_again(tmp_path: Path) -> None:
    """A finished run (results.json), or one with evaluations past its first checkpoint, whose checkpoints/
    were deleted: resume=true refuses by name and changes nothing (before, it emptied metrics.jsonl and
    retrained from step 0 beside the old results.json)."""
    import shutil

    finished = train_run(tmp_path, [*HISTORY, "train.iterations=20"], "finished")
    stopped = train_run(tmp_path, [*HISTORY, "train.stop_at=30", "train.checkpoint_every=10"], "stopped")
    for run_dir, named in ((finished, "results.json"), (stopped, "metrics.jsonl")):
        shutil.rmtree(run_dir / "checkpoints")
        before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
        with pytest.raises(FileNotFoundError, match=rf"{run_dir / 'checkpoints'}.*{named}"):
            train_run(tmp_path, ["experiment=quickstart", "resume=true", "train.num_threads=1"], run_dir.name)
        assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before
