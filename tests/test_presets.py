"""Experiment presets set the setting (data, model, budget); the algorithm's config sets the recipe.

A preset that set `train.mu` would silently replace the recipe of whichever algorithm it is combined
with (`algorithm=acr experiment=cpu_cifar10_lt` once trained ACR with mu=7). Every preset is checked
against every algorithm config, so a new preset or algorithm is covered without editing this file.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_imwa import composition
from tests.utils import CONFIG_DIR, ROOT, compose_config

PRESETS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
ALGORITHMS = sorted(path.stem for path in (CONFIG_DIR / "algorithm").glob("*.yaml"))
GROUPS = ("dataset", "model", "algorithm", "imwa")
ABSENT = object()


def _leaf_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in node.items():
        if key == "defaults" and not prefix:
            continue
        keys |= _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


# The recipe keys: every key that some algorithm's config file sets (train.mu, model.bn_momentum,
# algorithm.ema.warmup, dataset.protocol, ...).
RECIPE_KEYS = sorted(set().union(*(_leaf_keys(yaml.safe_load(path.read_text()))
                                   for path in (CONFIG_DIR / "algorithm").glob("*.yaml"))))


def _compose_with_choices(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    cfg = composition.compose_config(overrides, ".", with_hydra=True)
    choices = {group: str(cfg.hydra.runtime.choices[group]) for group in GROUPS}
    return cfg, choices


def _recipe(cfg: DictConfig) -> dict[str, Any]:
    return {key: OmegaConf.select(cfg, key, default=ABSENT) for key in RECIPE_KEYS}


def test_the_recipe_keys_are_found() -> None:
    assert {"train.mu", "train.schedule", "train.weight_decay", "train.wd_exclude_bias_bn", "model.bn_momentum",
            "algorithm.ema.warmup", "algorithm.ema.decay", "dataset.protocol"} <= set(RECIPE_KEYS)
    assert "train.iterations" not in RECIPE_KEYS and "train.batch_size" not in RECIPE_KEYS


@pytest.mark.parametrize("algorithm", [None, *ALGORITHMS])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_never_sets_a_recipe_key(preset: str, algorithm: str | None) -> None:
    """With the preset, every recipe key is what the same groups give without it (no algorithm typed:
    the algorithm the preset picks, e.g. quickstart's fixmatch_quickstart)."""
    typed = [] if algorithm is None else [f"algorithm={algorithm}"]
    with_preset, choices = _compose_with_choices([*typed, f"experiment={preset}"])
    without_preset, _ = _compose_with_choices([f"{group}={choice}" for group, choice in choices.items()])
    expected, found = _recipe(without_preset), _recipe(with_preset)
    overridden = {key: f"{found[key]!r} where algorithm={choices['algorithm']} has {expected[key]!r}"
                  for key in RECIPE_KEYS if found[key] != expected[key]}
    assert not overridden, f"experiment={preset} overrides the recipe: {overridden}"


def test_the_command_line_wins_over_recipe_and_preset() -> None:
    cfg = compose_config(["algorithm=acr", "experiment=cpu_cifar10_lt", "train.mu=3", "model.bn_momentum=0.01"])
    assert cfg.train.mu == 3 and cfg.model.bn_momentum == 0.01
    assert compose_config(["experiment=quickstart", "train.mu=2"]).train.mu == 2


@pytest.mark.slow
def test_cfg_job_shows_the_algorithms_recipe_under_a_preset() -> None:
    """The command of the report: ACR under the CPU-study preset keeps mu=1 and its EMA without warm-up."""
    printed = subprocess.run([sys.executable, str(ROOT / "main.py"), "algorithm=acr", "experiment=cpu_cifar10_lt",
                              "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cfg = yaml.safe_load(printed)
    assert cfg["train"]["mu"] == 1 and cfg["algorithm"]["ema"]["warmup"] is False
    assert cfg["model"]["bn_momentum"] == 0.001 and cfg["dataset"]["protocol"] == "nested"
    assert cfg["train"]["iterations"] == 1600 and cfg["model"]["name"] == "small_cnn"  # the preset's setting


def test_the_quick_start_is_fixmatch_with_mu_4_unless_an_algorithm_is_typed() -> None:
    cfg = compose_config(["experiment=quickstart"])
    assert (cfg.algorithm.name, cfg.train.mu, cfg.dataset.name, cfg.model.name, cfg.train.iterations) == \
        ("fixmatch", 4, "digits", "small_cnn", 600)
    assert compose_config(["experiment=quickstart", "algorithm=fixmatch"]).train.mu == 7


def test_presets_are_found() -> None:
    assert {"quickstart", "cifar10_lt", "cifar100_lt", "stl10_lt", "cpu_cifar10_lt"} <= set(PRESETS)
    assert {"fixmatch", "daso", "acr", "supervised"} <= set(ALGORITHMS)
