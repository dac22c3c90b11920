"""Hyperparameter search with Hydra's Optuna sweeper (hydra/sweeper=digits_search): the objective is each
trial's final balanced accuracy on the validation split, never the test split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.utils import ROOT

pytestmark = pytest.mark.slow
# docs/cluster.md's search (the digits regime with a validation split), its trials cut to 20 steps.
SHORT = ["experiment=cpu_digits_lt", "train.iterations=20", "train.eval_every=10",
         "train.num_threads=1"]


def _search(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "-m", "hydra/sweeper=digits_search", *SHORT,
                           *overrides, f"hydra.sweep.dir={tmp_path / 'search'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def test_four_trials_maximise_the_validation_balanced_accuracy(tmp_path: Path) -> None:
    result = _search(tmp_path, "hydra.sweeper.n_trials=4", "dataset.val_per_class=5")
    assert result.returncode == 0, result.stderr[-3000:]
    search = tmp_path / "search"
    trials = sorted(path for path in search.iterdir() if path.is_dir())
    assert len(trials) == 4
    values = {}
    for trial in trials:
        assert trial.name.split(",")[0].startswith("algorithm.threshold="), "named by the searched keys only"
        config = yaml.safe_load((trial / "config.yaml").read_text())
        assert 0.7 <= config["algorithm"]["threshold"] <= 0.98 and 0.003 <= config["train"]["lr"] <= 0.1
        assert config["train"]["mu"] in (2, 4, 7)
        results = json.loads((trial / "results.json").read_text())
        assert results["split_counts"]["validation"] == [5] * 10 and results["final_val"]["step"] == 20
        values[trial.name] = (results["final_val"]["balanced_acc"], config)
    best = yaml.safe_load((search / "optimization_results.yaml").read_text())
    best_trial = max(values.values(), key=lambda entry: entry[0])
    assert best["best_value"] == best_trial[0]
    assert best["best_params"]["algorithm.threshold"] == best_trial[1]["algorithm"]["threshold"]
    assert best["best_params"]["train.mu"] == best_trial[1]["train"]["mu"]


def test_a_search_without_a_validation_split_is_refused(tmp_path: Path) -> None:
    result = _search(tmp_path, "hydra.sweeper.n_trials=1")
    assert "maximises the final balanced accuracy on the validation split, and this run has none: set " \
           "dataset.val_per_class" in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "search").glob("*/results.json")), "no trial trained"
