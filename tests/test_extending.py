"""docs/extending.md's plugins, loaded from outside the repository: each kind trains, and its options are checked by name.

Every block of that page that starts with `# my_plugins/<module>.py` is written to a temporary
folder and named in `plugins=[...]`. A new kind of plugin adds its block to the page, its
overrides to PLUGIN_OVERRIDES, its bad values to BAD_VALUES and its built-in package to
BUILTIN_PACKAGES.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.utils import ROOT, compose_config, read_metrics, read_results, train_run

DOC = ROOT / "docs" / "extending.md"
PACKAGE = "my_plugins"

# Per plugin module of the page: the overrides that choose it and set its own option.
PLUGIN_OVERRIDES = {
    "entropy_min": ["~algorithm", "algorithm.name=entropy_min", "algorithm.weight=0.5"],
    "stripes": ["dataset.name=stripes", "dataset.noise=0.3"],
    "tiny_net": ["model.name=tiny_net", "model.width=8"],
}
TINY = ["experiment=quickstart", "train.iterations=10", "train.eval_every=5", "train.log_every=5",
        "train.batch_size=16", "train.mu=2", "train.num_threads=1"]

# Overrides on top of every plugin's (a later key wins), and what the error must name.
BAD_VALUES = [
    (["++algorithm.weight=-1"], "algorithm.weight=-1"),
    (["++dataset.noise=2"], "dataset.noise=2"),
    (["++model.width=0"], "model.width=0"),
    (["++model.width=wide"], "(key model.width)"),
    (["dataset.nois=0.1"], "unknown key dataset.nois; did you mean dataset.noise?"),
    (["model.name=small_cnn"], "model.width: unknown key; small_cnn takes no options of its own"),
]

# Built-in plugin package -> a lookup that must import it (and before which nothing may).
BUILTIN_PACKAGES = {
    "ssl_imwa.algorithms": "from ssl_imwa.algorithm import get_algorithm; get_algorithm('fixmatch')",
    "ssl_imwa.data.sources": "from ssl_imwa.data import get_dataset; get_dataset('digits')",
    "ssl_imwa.models.backbones": "from ssl_imwa.models.factory import get_backbone; get_backbone('wrn28_2')",
}


def page_modules() -> dict[str, str]:
    """Module name -> source, for every `# my_plugins/<module>.py` block of docs/extending.md."""
    blocks = re.findall(rf"```python\n(# {PACKAGE}/(\w+)\.py\n.*?)```", DOC.read_text(), re.DOTALL)
    return {name: code for code, name in blocks}


@pytest.fixture()
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The page's modules written under tmp_path/my_plugins; returns the `plugins=[...]` override."""
    modules = page_modules()
    assert sorted(modules) == sorted(PLUGIN_OVERRIDES), "every block of the page has its overrides here"
    package = tmp_path / "outside" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, code in modules.items():
        (package / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(package.parent))
    yield f"plugins=[{','.join(f'{PACKAGE}.{name}' for name in modules)}]"
    for name in [name for name in sys.modules if name.startswith(PACKAGE)]:
        del sys.modules[name]


def every_plugin(plugins: str) -> list[str]:
    return [plugins, *(override for overrides in PLUGIN_OVERRIDES.values() for override in overrides)]


def test_the_page_s_plugins_train_together(tmp_path: Path, plugins: str) -> None:
    run_dir = train_run(tmp_path, [*TINY, *every_plugin(plugins)])
    assert read_results(run_dir)["status"] == "complete"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["algorithm"]["name"], config["algorithm"]["weight"]) == ("entropy_min", 0.5)
    assert (config["dataset"]["name"], config["dataset"]["noise"]) == ("stripes", 0.3)
    assert (config["model"]["name"], config["model"]["width"]) == ("tiny_net", 8)
    tests = [row for row in read_metrics(run_dir) if row["split"] == "test"]
    assert [row["step"] for row in tests] == [5, 10] and len(tests[-1]["per_class"]) == 4


def test_an_option_s_default_comes_from_its_dataclass(plugins: str) -> None:
    from ssl_imwa.config import validate

    options = ("algorithm.weight", "dataset.noise", "model.width")   # left out: their defaults apply
    overrides = [override for override in every_plugin(plugins) if not override.startswith(options)]
    typed = validate(compose_config(["experiment=quickstart", *overrides]))
    assert (typed.algorithm.weight, typed.dataset.noise, typed.model.width) == (0.1, 0.2, 16)


@pytest.mark.parametrize("overrides, named", BAD_VALUES, ids=[" ".join(case[0]) for case in BAD_VALUES])
def test_a_bad_option_is_refused_naming_its_key(plugins: str, overrides: list[str], named: str) -> None:
    from omegaconf.errors import OmegaConfBaseException

    from ssl_imwa.config import validate
    from ssl_imwa.user_errors import message_of

    with pytest.raises((ValueError, OmegaConfBaseException)) as error:
        validate(compose_config(["experiment=quickstart", *every_plugin(plugins), *overrides]))
    assert named in message_of(error.value), message_of(error.value)
    assert message_of(error.value).startswith(named) or named.startswith("(key ")


@pytest.mark.slow
def test_the_engine_imports_no_built_in_plugin_until_a_lookup() -> None:
    """In a fresh interpreter: every engine module imported, no module of a built-in plugin package
    loaded; then each package's first lookup loads it."""
    code = f"""
import importlib, pkgutil, sys
import ssl_imwa
packages = {sorted(BUILTIN_PACKAGES)!r}

def engine_modules(path, prefix):
    for module in pkgutil.iter_modules(path):
        name = prefix + module.name
        if name in packages or module.name == "__main__":
            continue
        yield name
        if module.ispkg:
            yield from engine_modules([f"{{path[0]}}/{{module.name}}"], name + ".")

for name in list(engine_modules(ssl_imwa.__path__, "ssl_imwa.")):
    importlib.import_module(name)
loaded = lambda package: [name for name in sys.modules if name.startswith(package + ".")]
assert not any(loaded(package) for package in packages), [loaded(package) for package in packages]
"""
    for package, lookup in BUILTIN_PACKAGES.items():
        code += f"{lookup}\nassert loaded({package!r}), {package!r}\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_a_plugin_s_own_config_file_is_found_on_hydra_s_search_path(plugins: str, tmp_path: Path) -> None:
    """`algorithm=entropy_min` from the plugin's own config folder (hydra.searchpath), checked by main.py
    before Hydra starts as the repository's own config groups are."""
    group = tmp_path / "my_configs" / "algorithm"
    group.mkdir(parents=True)
    (group / "entropy_min.yaml").write_text("# @package _global_\nalgorithm:\n  name: entropy_min\n  weight: 0.25\n")
    command = [sys.executable, str(ROOT / "main.py"), "experiment=quickstart", plugins, "algorithm=entropy_min",
               f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]", "--check"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'outside'}:{ROOT}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "config OK" in result.stdout, result.stdout + result.stderr
    typo = subprocess.run([*command[:4], "algorithm=entropy_mn", *command[5:]], capture_output=True, text=True,
                          timeout=300, check=False, cwd=tmp_path, env=env)
    assert "did you mean algorithm=entropy_min?" in typo.stderr, typo.stderr
