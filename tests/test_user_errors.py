"""A mistake in the input is one or two lines on the console; a bug keeps its traceback."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf.errors import ConfigKeyError

from ssl_imwa.user_errors import raised_on_purpose, refuse_an_unwritable_directory
from tests.utils import ROOT, compose_config, train_run

TINY = ["experiment=quickstart", "train.iterations=4", "train.eval_every=2", "train.batch_size=8", "train.mu=1",
        "train.num_threads=1"]


def _caught(action) -> BaseException:
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - the test inspects whatever was raised
        return error
    raise AssertionError("expected an exception")


def test_what_counts_as_the_users_mistake() -> None:
    from ssl_imwa.config import validate

    bad_value = _caught(lambda: validate(compose_config([*TINY, "algorithm.threshold=1.5"])))
    assert isinstance(bad_value, ValueError) and raised_on_purpose(bad_value)
    unknown_key = _caught(lambda: validate(compose_config([*TINY, "+train.bogus=1"])))
    assert isinstance(unknown_key, ConfigKeyError) and raised_on_purpose(unknown_key)
    assert raised_on_purpose(OSError(errno.ENOSPC, "No space left on device"))
    # Raised inside torch, or a broken invariant of ours: bugs, whose traceback must survive.
    inside_torch = _caught(lambda: torch.zeros(2).view(3))
    assert isinstance(inside_torch, RuntimeError) and not raised_on_purpose(inside_torch)
    assert not raised_on_purpose(_caught(lambda: {}['missing']))  # a lookup of ours that failed
    assert not raised_on_purpose(_caught(lambda: int("twelve")))  # a builtin failing, not a `raise` of ours


def _main(arguments: list[str], tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    if "HYDRA_FULL_ERROR" not in environment:
        env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_a_bad_value_is_two_lines(tmp_path: Path) -> None:
    arguments = [*TINY, "algorithm.threshold=1.5", f"hydra.run.dir={tmp_path / 'run'}"]
    short = _main(arguments, tmp_path)
    assert short.returncode == 1
    lines = (short.stdout + short.stderr).strip().splitlines()
    assert lines == ["error: algorithm.threshold=1.5: expected a finite value in [0, 1]",
                     "(HYDRA_FULL_ERROR=1 shows the traceback)"], lines


def test_hydra_full_error_lets_the_traceback_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_imwa.user_errors import short_user_errors

    def refuse() -> None:
        raise ValueError("train.lr=-1: expected a finite value in (0, inf)")

    with pytest.raises(SystemExit) as stopped, short_user_errors():
        refuse()
    assert stopped.value.code == 1
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="train.lr=-1"), short_user_errors():
        refuse()


@pytest.mark.slow
def test_an_unwritable_run_directory_is_named_before_hydra_starts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EROFS, "Read-only file system")

    target = tmp_path / "frozen" / "run"
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OSError, match=rf"cannot create run directory {target}: {tmp_path} is not writable "
                                      r"\(Read-only file system, EROFS\)"):
        refuse_an_unwritable_directory(target)
    monkeypatch.undo()
    refuse_an_unwritable_directory(target)  # writable: no error, and nothing left behind
    assert list(tmp_path.iterdir()) == []
    # The real thing: sysfs refuses new directories even to root.
    result = _main([*TINY, "hydra.run.dir=/sys/ssl_imwa_test/run"], tmp_path)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, lines
    assert "cannot create run directory /sys/ssl_imwa_test/run: /sys is not writable" in lines[0]


def test_plugin_faults_name_the_plugin_and_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_imwa.registry import load_plugins

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_syntax_plugin.py").write_text("import torch\ndef losses(:\n")
    with pytest.raises(ImportError, match=r"'broken_syntax_plugin': .*broken_syntax_plugin.py:2: SyntaxError"):
        load_plugins(["broken_syntax_plugin"])
    (tmp_path / "no_losses_plugin.py").write_text(
        "from ssl_imwa.algorithms.fixmatch import FixMatchConfig\nfrom ssl_imwa.algorithm import Algorithm\n"
        "from ssl_imwa.algorithm import register_algorithm\n\n"
        "@register_algorithm('no_losses')\nclass NoLosses(Algorithm):\n    Config = FixMatchConfig\n")
    with pytest.raises(ImportError, match=r"no_losses_plugin.py:5: TypeError: algorithm 'no_losses' "
                                          r"\(no_losses_plugin.NoLosses\) does not define losses"):
        load_plugins(["no_losses_plugin"])


def test_losses_without_a_loss_entry_names_what_it_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lossless_plugin.py").write_text(
        "from ssl_imwa.algorithms.fixmatch import FixMatch\nfrom ssl_imwa.algorithm import register_algorithm\n\n"
        "@register_algorithm('total_not_loss')\nclass TotalNotLoss(FixMatch):\n"
        "    def losses(self, batch, model, teacher, step):\n"
        "        outputs = super().losses(batch, model, teacher, step)\n"
        "        outputs['total'] = outputs.pop('loss')\n        return outputs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"algorithm 'total_not_loss': losses\(\) returned \[.*'total'.*\], "
                                         r"expected a 'loss' entry"):
        train_run(tmp_path, [*TINY, "plugins=[lossless_plugin]", "algorithm.name=total_not_loss"])


@pytest.mark.slow
def test_the_resolved_config_prints_without_a_run_directory(tmp_path: Path) -> None:
    """`main.py --cfg job --resolve` has no output directory: run_dir resolves to null, not a crash."""
    result = _main(["experiment=quickstart", "--cfg", "job", "--resolve"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run_dir: null" in result.stdout and "name: fixmatch" in result.stdout


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    return (result.stdout + result.stderr).strip().splitlines()


def test_a_mistake_hydra_finds_while_composing_is_one_line() -> None:
    """Hydra composes before this project's code runs and would print 8 to 16 lines (advising
    `+train.iteratons=5` for a typo, which then fails again): main.py checks the composition first."""
    import ssl_imwa

    cases = {
        "train.iteratons=5": "unknown key train.iteratons; did you mean train.iterations?",
        "algorithm=fixmatc": "algorithm=fixmatc: no such option; algorithm= takes one of "
                             f"{', '.join(sorted(path.stem for path in (ROOT / 'configs' / 'algorithm').glob('*.yaml')))}"
                             "; did you mean algorithm=fixmatch?",
        "train.lr=fast": "train.lr=fast: Value 'fast' of type 'str' could not be converted to Float",
        "+train.lr=1": "+train.lr=1: train.lr already exists; set it without the +: train.lr=1",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError) as error:
            ssl_imwa.compose(["experiment=quickstart", override])
        assert str(error.value) == message
    with pytest.raises(ValueError, match=r"^cannot read the override 'train.lr=\[1': no viable alternative"):
        ssl_imwa.compose(["train.lr=[1"])
    with pytest.raises(ValueError, match=r"^unknown key train.foo; train has iterations, batch_size, mu, lr"):
        ssl_imwa.compose(["train.foo=1"])


@pytest.mark.slow
def test_main_says_a_typo_in_two_lines_even_in_a_sweep(tmp_path: Path) -> None:
    typo = _main([*TINY, "train.iteratons=5", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert typo.returncode == 1 and _lines(typo) == [
        "error: unknown key train.iteratons; did you mean train.iterations?",
        "(HYDRA_FULL_ERROR=1 shows the traceback)"], _lines(typo)
    # the second value of a sweep is composed before the first job starts
    sweep = _main(["-m", *TINY, "algorithm=supervised,fixmatc", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert sweep.returncode == 1 and len(_lines(sweep)) == 2, _lines(sweep)
    assert _lines(sweep)[0].startswith("error: algorithm=fixmatc: no such option; algorithm= takes one of abc, acr, ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_check_validates_every_job_and_writes_nothing(tmp_path: Path) -> None:
    """`--cfg job` prints a config with bad values and exits 0; `--check` is the dry run that validates."""
    bad = _main(["experiment=quickstart", "train.lr=-1", "imwa.k=0", "--check", f"hydra.run.dir={tmp_path / 'a'}"],
                tmp_path)
    assert bad.returncode == 1
    assert _lines(bad) == ["error: train.lr=-1.0: expected a finite value in (0, inf)",
                           "error: imwa.k=0: expected an integer >= 1"], _lines(bad)
    good = _main(["-m", "experiment=quickstart", "train.lr=0.1,0.03", "--check",
                  f"hydra.sweep.dir={tmp_path / 'b'}"], tmp_path)
    assert good.returncode == 0, _lines(good)
    assert _lines(good) == ["config OK: 2 jobs; validated without loading data, nothing written"]
    assert list(tmp_path.iterdir()) == []  # no run directory, no outputs/, no main.log


def test_a_damaged_saved_config_is_named_on_resume(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ssl_imwa.resume import resumed_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config(["experiment=quickstart"], run_dir)
    record = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(record + "train: [oops\n")
    with pytest.raises(ValueError) as error:
        resumed_config(cfg, ["resume=true"])
    assert str(error.value) == (f"{run_dir / 'config.yaml'} (the run's saved config) is not valid YAML: expected "
                                "',' or ']', but got '<stream end>' at line "
                                f"{len(record.splitlines()) + 2}; repair it, or start a new run")
    (run_dir / "config.yaml").write_text(record.replace("name: fixmatch", "name: acr"))
    with pytest.raises(ValueError) as error:
        resumed_config(cfg, ["resume=true"])
    assert str(error.value).startswith(f"{run_dir / 'config.yaml'} (the run's saved config) is not a valid config: "
                                       "unknown key algorithm.lambda_u; algorithm has ")


def test_divergence_stopped_on_purpose_is_a_short_error() -> None:
    """`train.lr=1e6` stops at the first non-finite loss: the message is the whole story (was 21 lines)."""
    from types import SimpleNamespace

    from ssl_imwa.imwa import Orchestrator

    orchestrator = SimpleNamespace(first_nonfinite={0: torch.tensor(1)}, episode=0, replica_steps={0: 2})
    error = _caught(lambda: Orchestrator._ensure_finite(orchestrator, [SimpleNamespace(index=0)]))
    assert isinstance(error, FloatingPointError) and raised_on_purpose(error)
    assert str(error).startswith("replica 0, episode 1: the loss is not finite at step 1")


def test_a_constant_image_folder_is_refused_by_channel(tmp_path: Path) -> None:
    """All-black images (or one constant channel) gave std 0, then 'loss is not finite at step 1'."""
    import numpy as np
    from PIL import Image

    from ssl_imwa.data import DatasetConfig, build_data

    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                pixels = np.zeros((8, 8, 3), dtype=np.uint8)
                pixels[..., 0] = np.random.default_rng(index).integers(0, 255, (8, 8))  # red varies, green is 0
                pixels[..., 2] = 7
                Image.fromarray(pixels).save(tmp_path / split / name / f"{index}.png")
    with pytest.raises(ValueError) as error:
        build_data(DatasetConfig(name="imagefolder", root=str(tmp_path), n_max=2, m_max=1, imbalance=1))
    assert str(error.value).startswith(f"{tmp_path}/train: channel 1 of 3 (and 1 more) has the same value 0/255 in "
                                       "every pixel (std 0)"), str(error.value)


def test_a_checkpoint_of_another_experiment_names_the_keys_in_one_line(tmp_path: Path) -> None:
    from ssl_imwa import checkpoint
    from ssl_imwa.checkpoint import load_checkpoint, save_atomic
    from ssl_imwa.rng import rng_state

    payload = {"format_version": checkpoint.FORMAT_VERSION, "fingerprint": {"seed": 0, "model.name": "small_cnn"},
               "progress": {"episode": 0, "replica_steps": {0: 1}}, "replicas": [{"model": {"w": torch.ones(2)}}],
               "run_state": {"rng": {"numpy": rng_state(torch.device("cpu"))["numpy"]}}}
    save_atomic(payload, tmp_path / "latest.pt")
    with pytest.raises(RuntimeError) as error:
        load_checkpoint(tmp_path / "latest.pt", {"seed": 1, "model.name": "wrn28_2"})
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert "seed: checkpoint has 0, config has 1; model.name: checkpoint has 'small_cnn', config has 'wrn28_2'" in message


@pytest.mark.slow
def test_a_run_directory_name_too_long_or_quoted_is_handled_before_hydra(tmp_path: Path) -> None:
    """300 characters: ENAMETOOLONG in 12 lines; a quoted path was probed with its quotes (Hydra strips them)."""
    long_name = _main([*TINY, f"hydra.run.dir={tmp_path / ('a' * 300)}"], tmp_path)
    assert long_name.returncode == 1 and len(_lines(long_name)) == 2, _lines(long_name)
    assert "has 300 bytes, the file system allows 255 per name; choose a shorter hydra.run.dir" in _lines(long_name)[0]
    quoted = _main([*TINY, "hydra.run.dir='/sys/ssl_imwa_ünï/run'"], tmp_path)
    assert quoted.returncode == 1 and len(_lines(quoted)) == 2, _lines(quoted)
    assert "cannot create run directory /sys/ssl_imwa_ünï/run: /sys is not writable" in _lines(quoted)[0]
    assert list(tmp_path.iterdir()) == []
