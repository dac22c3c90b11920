"""The worked example in docs/adding_an_algorithm.md is a real external plugin: load it and train."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import algorithm_context, read_metrics, read_results, train_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_an_algorithm.md"


@pytest.fixture()
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    code = re.search(r"```python\n(# my_algorithms/teacher_pseudo_label.py\n.*?)```", DOC.read_text(), re.DOTALL).group(1)
    package = tmp_path / "my_algorithms"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "teacher_pseudo_label.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_algorithms.teacher_pseudo_label"
    for name in [name for name in sys.modules if name.startswith("my_algorithms")]:
        del sys.modules[name]


def test_example_loss_matches_hand_computation(plugin_module: str) -> None:
    from ssl_imwa.algorithm import get_algorithm
    from ssl_imwa.registry import load_plugins

    load_plugins([plugin_module])
    cls = get_algorithm("teacher_pseudo_label")
    algorithm = cls(cls.Config(threshold=0.9, lambda_u=1.0), algorithm_context([3, 1], 10))

    class Model(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.logits[: x.shape[0]] if x.shape[0] != 3 else self.logits}

    student = Model(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))  # x (1 image) + strong (2 images)
    teacher = Model(torch.tensor([[4.0, 0.0], [0.0, 0.5]]))              # weak: confident class 0, unsure
    batch = {"x": torch.zeros(1, 1), "y": torch.tensor([0]), "u_weak": torch.zeros(2, 1),
             "u_strong": [torch.zeros(2, 1)]}
    out = algorithm.losses(batch, student, teacher, 0)
    ce = lambda logits, t: -logits[t] + math.log(sum(math.exp(v) for v in logits))
    assert math.isclose(out["loss_x"].item(), ce([1.0, 0.0], 0), rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), ce([0.0, 0.0], 0) / 2, rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 0.5)


def test_example_trains_as_external_plugin(tmp_path: Path, plugin_module: str) -> None:
    run_dir = train_run(tmp_path, [
        "experiment=quickstart", f"plugins=[{plugin_module}]", "~algorithm", "algorithm.name=teacher_pseudo_label",
        "+algorithm.threshold=0.8", "train.iterations=10", "train.eval_every=5", "train.log_every=5",
        "train.batch_size=16", "train.mu=2"])
    assert read_results(run_dir)["final"]["top1"] >= 0.0
    config = (run_dir / "config.yaml").read_text()
    assert "name: teacher_pseudo_label" in config and "threshold: 0.8" in config and "lambda_u: 1.0" in config
    tests = [r for r in read_metrics(run_dir) if r["split"] == "test"]
    assert [(r["step"], r["source"]) for r in tests] == [(5, "replica"), (10, "replica")]  # K=1: no merge to evaluate
    results = read_results(run_dir)
    assert results["final"]["per_class"] == tests[-1]["per_class"]
    assert results["imwa"]["per_episode"][0]["top1"] == tests[-1]["top1"]
