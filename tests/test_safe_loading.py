"""Opening a run never runs its code: every checkpoint is read by torch's weights-only unpickler.

A planted `__reduce__` payload (what a malicious or tampered checkpoint carries) is refused by every
way a user opens a run (resume, load_run, evaluate, the report) before any of it is used, and the
command it carries never runs. Older checkpoints are converted only through the explicit opt-in.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_imwa.checkpoint import (
    DIGEST_KEY,
    FORMAT_VERSION,
    UnsafeCheckpoint,
    contents_digest,
    load_checkpoint,
    read_checkpoint,
    save_atomic,
)
from ssl_imwa.upgrade_checkpoint import KEYS_ADDED_LATER, _numpy_leaf, upgrade
from tests.reference_runs import DISTRIBUTED, ReferenceRun
from tests.utils import (
    ROOT,
    assert_same_run,
    run_processes,
    train_run,
)

pytestmark = pytest.mark.slow   # every test here trains or shares a module's training run
TINY = DISTRIBUTED


class RunsACommand:
    """Unpickling this runs `touch <marker>`: the side effect a test watches for."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant_payload(path: Path, marker: Path) -> None:
    """Add an entry that runs a command when unpickled, with a digest that matches (as anyone who can
    write the file can write): only the loader's refusal stands between the file and the command."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    stored.pop(DIGEST_KEY)
    stored["tree"]["run_state"]["note"] = "harmless"
    stored[DIGEST_KEY] = contents_digest(stored)
    stored["tree"]["run_state"]["note"] = RunsACommand(marker)
    torch.save(stored, path)


def _main(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K=2, E=2, stopped in episode 2: latest.pt at step 15 and merge_001.pt after step 10."""
    run_dir = train_run(tmp_path_factory.mktemp("safe"), [*TINY, "train.stop_at=15"])
    assert {"latest.pt", "merge_001.pt"} <= {path.name for path in (run_dir / "checkpoints").iterdir()}
    return run_dir


def _opened_every_way(run_dir: Path, checkpoint: str, marker: Path, tmp_path: Path) -> list[str]:
    """resume=true, load_run, evaluate and the report on `run_dir`: what each said."""
    import ssl_imwa

    said = []
    resumed = _main(str(ROOT / "main.py"), *TINY, "resume=true", f"hydra.run.dir={run_dir}", "train.progress=false")
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    said.append(resumed.stderr)
    with pytest.raises(UnsafeCheckpoint) as refused:
        ssl_imwa.load_run(run_dir, checkpoint)
    said.append(str(refused.value))
    evaluated = _main("-m", "ssl_imwa.evaluate", str(run_dir), "--checkpoint", checkpoint)
    assert evaluated.returncode == 1, evaluated.stderr[-3000:]
    said.append(evaluated.stderr)
    reported = _main("-m", "ssl_imwa.report", str(run_dir), "--out", str(tmp_path / "report"))
    assert reported.returncode == 0, reported.stderr[-3000:]  # the report reads no checkpoint at all
    assert not marker.exists(), "the planted command ran"
    return said
def test_a_payload_in_latest_pt_is_refused_by_every_way_of_opening_a_run(stopped_run: Path, tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    shutil.copytree(stopped_run, run_dir)
    plant_payload(run_dir / "checkpoints" / "latest.pt", marker)
    before = (run_dir / "checkpoints" / "latest.pt").read_bytes()
    for message in _opened_every_way(run_dir, "latest", marker, tmp_path):
        assert f"checkpoint {run_dir / 'checkpoints' / 'latest.pt'} refused: it holds posix.system" in message, message
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == before, "a refused file is left as it is"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
def test_a_payload_in_the_merge_checkpoint_that_the_fallback_reaches_is_refused(stopped_run: Path,
                                                                                tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    shutil.copytree(stopped_run, run_dir)
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"half a checkpoint")  # the resume falls back to merge_001
    plant_payload(run_dir / "checkpoints" / "merge_001.pt", marker)
    for message in _opened_every_way(run_dir, "merge_001", marker, tmp_path):
        assert "merge_001.pt refused: it holds posix.system" in message, message
def test_a_refused_latest_pt_is_never_skipped_for_an_older_checkpoint(stopped_run: Path, tmp_path: Path) -> None:
    """A corrupt latest.pt falls back to the newest intact merge; a refused one stops the resume."""
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    shutil.copytree(stopped_run, run_dir)
    plant_payload(run_dir / "checkpoints" / "latest.pt", marker)
    resumed = _main(str(ROOT / "main.py"), *TINY, "resume=true", f"hydra.run.dir={run_dir}", "train.progress=false")
    assert resumed.returncode == 1 and "resuming from" not in resumed.stdout + resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) <= 2, resumed.stderr
    assert not marker.exists()
def test_a_payload_in_one_process_checkpoint_of_a_torchrun_run_is_refused(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    results = run_processes(2, [*TINY, "train.stop_at=15"], run_dir)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    plant_payload(run_dir / "checkpoints" / "latest.rank1.pt", marker)
    resumed = run_processes(2, [*TINY, "resume=true"], run_dir)
    assert all(code != 0 for code, _ in resumed)
    for _, output in resumed:
        assert "latest.rank1.pt refused: it holds posix.system" in output, output[-3000:]
    import ssl_imwa

    with pytest.raises(UnsafeCheckpoint, match="latest.rank1.pt refused"):
        ssl_imwa.load_run(run_dir, "latest.rank1.pt")
    evaluated = _main("-m", "ssl_imwa.evaluate", str(run_dir), "--checkpoint", "latest.rank1.pt")
    assert evaluated.returncode == 1 and "latest.rank1.pt refused" in evaluated.stderr, evaluated.stderr[-3000:]
    assert _main("-m", "ssl_imwa.report", str(run_dir), "--out", str(tmp_path / "report")).returncode == 0
    assert not marker.exists(), "the planted command ran"


def test_every_checkpoint_a_run_writes_loads_weights_only(stopped_run: Path) -> None:
    for path in (stopped_run / "checkpoints").glob("*.pt"):
        assert torch.load(path, map_location="cpu", weights_only=True)["format_version"] == FORMAT_VERSION
        assert isinstance(read_checkpoint(path)["run_state"]["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_payload_that_could_not_be_loaded_safely_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="holds a numpy.ndarray"):
        save_atomic({"format_version": 3, "state": np.zeros(2)}, tmp_path / "latest.pt")
    assert list(tmp_path.iterdir()) == []


def _as_format_2(path: Path) -> None:
    """Rewrite a checkpoint as ssl-imwa wrote it before format 3: NumPy's RNG state as NumPy arrays,
    the digest over them, and no keys added to the fingerprint since."""
    payload = read_checkpoint(path)
    state = payload["run_state"]["rng"]["numpy"]
    payload["run_state"]["rng"]["numpy"] = (state["bit_generator"], state["keys"].numpy().astype(np.uint32),
                                            state["position"], state["has_gauss"], state["cached_gaussian"])
    for key in KEYS_ADDED_LATER:
        payload["fingerprint"].pop(key)
    payload["format_version"] = 2
    payload[DIGEST_KEY] = contents_digest(payload, other_leaf=_numpy_leaf)
    torch.save(payload, path)
def test_an_older_checkpoint_is_refused_until_converted_with_trust_and_then_resumes_bitwise(
        stopped_run: Path, tmp_path: Path, reference_run: ReferenceRun) -> None:
    full = reference_run(TINY)
    run_dir = tmp_path / "old"
    shutil.copytree(stopped_run, run_dir)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        _as_format_2(path)
    resume = [str(ROOT / "main.py"), *TINY, "resume=true", f"hydra.run.dir={run_dir}", "train.progress=false"]
    refused = _main(*resume)
    assert refused.returncode == 1
    assert "holds numpy._core.multiarray._reconstruct" in refused.stderr, refused.stderr
    assert "python -m ssl_imwa.upgrade_checkpoint --trust" in refused.stderr

    without_trust = _main("-m", "ssl_imwa.upgrade_checkpoint", str(run_dir))
    assert without_trust.returncode == 2 and "--trust" in without_trust.stderr
    converted = _main("-m", "ssl_imwa.upgrade_checkpoint", "--trust", str(run_dir))
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.count(f"format 2 converted to format {FORMAT_VERSION}") == 2
    assert (run_dir / "checkpoints" / "latest.pt.format2").is_file(), "the original is kept beside it"

    resumed = _main(*resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(full, run_dir)
def test_a_damaged_older_checkpoint_is_not_converted(stopped_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    shutil.copy(stopped_run / "checkpoints" / "latest.pt", path)
    _as_format_2(path)
    payload = torch.load(path, weights_only=False)
    payload["progress"]["episode"] = 0
    torch.save(payload, path)
    before = path.read_bytes()
    converted = _main("-m", "ssl_imwa.upgrade_checkpoint", "--trust", str(path))
    assert converted.returncode == 1 and "do not match the digest" in converted.stderr, converted.stderr
    assert path.read_bytes() == before and not (tmp_path / "latest.pt.format2").exists()
    with pytest.raises(UnsafeCheckpoint, match="holds numpy"):
        load_checkpoint(path, {})


def test_a_format_3_checkpoint_converts_to_the_same_values(stopped_run: Path, tmp_path: Path) -> None:
    """Format 3 held each tensor as a leaf of the payload (slow to read weights-only), with the digest of
    the payload itself; converted, it reads back with every value it held."""
    path = tmp_path / "latest.pt"
    payload = read_checkpoint(stopped_run / "checkpoints" / "latest.pt")
    torch.save({**payload, "format_version": 3, DIGEST_KEY: contents_digest({**payload, "format_version": 3})}, path)
    with pytest.raises(RuntimeError, match="has format version 3, this code reads version"):
        load_checkpoint(path, {})
    assert upgrade(path) == 3 and (tmp_path / "latest.pt.format3").is_file()
    assert contents_digest(read_checkpoint(path)) == contents_digest(payload)
