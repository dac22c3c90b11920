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
    from ssl_imwa.algorithm import load_plugins

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


def test_the_resolved_config_prints_without_a_run_directory(tmp_path: Path) -> None:
    """`main.py --cfg job --resolve` has no output directory: run_dir resolves to null, not a crash."""
    result = _main(["experiment=quickstart", "--cfg", "job", "--resolve"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run_dir: null" in result.stdout and "name: fixmatch" in result.stdout
