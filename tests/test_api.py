"""The Python API (docs/python_api.md): train the quick start from Python and load its models."""
from __future__ import annotations

import logging
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
def trained_and_logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl_imwa.TrainResult, list[str]]:
    """The quick start trained through the API, and the lines it logged to the `ssl_imwa` logger."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ssl_imwa")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not `.level =`: it clears the loggers' cached decisions
    try:
        return ssl_imwa.train(QUICK, run_dir=tmp_path_factory.mktemp("api") / "run"), lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def trained(trained_and_logged: tuple[ssl_imwa.TrainResult, list[str]]) -> ssl_imwa.TrainResult:
    return trained_and_logged[0]


@pytest.mark.slow
def test_the_start_line_names_the_preset_passed(trained_and_logged: tuple[ssl_imwa.TrainResult, list[str]]) -> None:
    """A run started from Python has no Hydra record (.hydra/hydra.yaml), and its start line said
    `preset experiment=none` although experiment=quickstart was passed."""
    _, lines = trained_and_logged
    start = next(line for line in lines if line.startswith("run dir "))
    assert "| preset experiment=quickstart |" in start


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


def environment_on_top(venv: Path) -> Path:
    """A fresh virtual environment that sees this interpreter's packages (torch, pip, setuptools), and its python.

    Not `venv --system-site-packages`: from inside a virtual environment (the README's setup) that
    shows the *base* interpreter's packages (no torch, maybe an old setuptools and no `wheel`:
    `invalid command 'bdist_wheel'`), not the ones this test runs with. A .pth file in the new
    environment adds this interpreter's site directories (with their own .pth files) instead,
    after its own site-packages, so what it installs comes first.
    """
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else []),
             sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    outer = [path for path in dict.fromkeys(outer) if Path(path).is_dir() and Path(path) != Path(inner)]
    (Path(inner) / "_outer_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in outer))
    return python


@pytest.mark.slow
def test_an_editable_install_trains_and_loads_from_anywhere(tmp_path: Path) -> None:
    """`pip install -e .` into a fresh environment (offline, with this environment's pip, setuptools and
    torch, however this one was made), then the API from another directory, where packages named
    `datasets` (Hugging Face's) and `algorithms` come first on the path: ours live under ssl_imwa."""
    python = environment_on_top(tmp_path / "venv")
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


def test_compose_validates_as_a_run_would() -> None:
    """docs/python_api.md: compose gives every error a run would give, `train.lr=-1` included."""
    with pytest.raises(ValueError, match=r"^train.lr=-1.0: expected a finite value in \(0, inf\)$"):
        ssl_imwa.compose(["experiment=quickstart", "train.lr=-1"])
    with pytest.raises(ValueError, match=r"^unknown key train.iteratons; did you mean train.iterations\?$"):
        ssl_imwa.compose(["experiment=quickstart", "train.iteratons=5"])
