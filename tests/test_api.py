"""The Python API (docs/python_api.md): train the quick start from Python and load its models."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssl_imwa
from tests.utils import ROOT, read_results

QUICK = ["experiment=quickstart", "train.iterations=20", "train.eval_every=10", "train.num_threads=1",
         "train.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> ssl_imwa.TrainResult:
    return ssl_imwa.train(QUICK, run_dir=tmp_path_factory.mktemp("api") / "run")


def test_train_returns_the_runs_results_and_directory(trained: ssl_imwa.TrainResult) -> None:
    results, run_dir = trained
    assert results is not None and results == read_results(run_dir)
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert ssl_imwa.compose(QUICK).train.mu == 4  # the quick start's own config, as main.py composes it


def test_the_loaded_teacher_reproduces_the_runs_final_top1_exactly(trained: ssl_imwa.TrainResult) -> None:
    results, run_dir = trained
    run = ssl_imwa.load_run(run_dir, device="cpu")
    assert len(run.replicas) == 1 and run.teacher is run.replicas[0].teacher
    for model in (run.teacher, run.student):
        assert not model.training
        assert {parameter.device for parameter in model.parameters()} == {torch.device("cpu")}
    targets = run.data.test_targets
    predicted = run.predict(run.data.test_images)
    assert predicted.shape == targets.shape
    assert (predicted == targets).sum().item() / len(targets) == results["final"]["top1"]
    # the student is a different model: its own weights, not the EMA teacher's
    assert any(not torch.equal(a, b) for a, b in zip(run.teacher.state_dict().values(),
                                                     run.student.state_dict().values(), strict=True))


def test_a_run_directory_is_an_argument_not_an_override(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_dir=..."):
        ssl_imwa.train([*QUICK, f"run_dir={tmp_path}"])


def test_importing_the_package_stays_cheap() -> None:
    """`import ssl_imwa` (for the API's names) must not pay for torch or Hydra before they are used."""
    code = "import sys, ssl_imwa; print(sorted({'torch', 'hydra'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_an_editable_install_trains_and_loads_from_anywhere(tmp_path: Path) -> None:
    """`pip install -e .` into a fresh environment (with the system's pip and setuptools: offline), then the API from another directory, where packages
    named `datasets` (Hugging Face's) and `algorithms` come first on the path: ours live under ssl_imwa."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-e", str(ROOT)], check=True, cwd=tmp_path)
    for name in ("datasets", "algorithms"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the foreign {name} package was imported')\n")
    code = ("import ssl_imwa\n"
            f"results, run_dir = ssl_imwa.train({[*QUICK[:1], 'train.iterations=4', 'train.eval_every=4', *QUICK[3:]]!r}, "
            "run_dir='run')\n"
            "run = ssl_imwa.load_run(run_dir)\n"
            "correct = (run.predict(run.data.test_images) == run.data.test_targets).sum().item()\n"
            "accuracy = correct / len(run.data.test_targets)\n"
            "print(ssl_imwa.__file__, accuracy == results['final']['top1'])")
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    location, same = result.stdout.split()
    assert Path(location).is_relative_to(ROOT) and same == "True"
