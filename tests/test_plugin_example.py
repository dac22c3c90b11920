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


EVERY_HOOK = '''
"""An algorithm outside the repository that uses every hook of the contract (tests/test_plugin_example.py)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import Algorithm, AlgorithmConfig, mean_of_states, register_algorithm

HEAD = "logits_adjusted"


@dataclass
class EveryHookConfig(AlgorithmConfig):
    name: str = "every_hook"
    threshold: float = 0.5
    generations: int = 2
    pass_every: int = 5
    keep: float = 0.25

    def generation_count(self) -> int:
        return self.generations


@register_algorithm("every_hook")
class EveryHook(Algorithm):
    Config = EveryHookConfig
    eval_head = HEAD
    unlabeled_pass_model = "student"

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.register_buffer("confidence", torch.zeros(context.num_unlabeled, device=self.device))
        self.register_buffer("class_threshold", torch.full((self.num_classes,), cfg.threshold, device=self.device))
        self.register_buffer("passes", torch.zeros((), dtype=torch.long, device=self.device))
        self.register_buffer("inherited_passes", torch.zeros((), dtype=torch.long, device=self.device))
        self.register_buffer("generation", torch.tensor(context.generation, device=self.device))
        original = torch.tensor(list(context.original_labeled_counts), device=self.device)
        self.register_buffer("pseudo_labeled", (torch.tensor(list(context.labeled_counts), device=self.device)
                                                - original).sum())
        self.register_buffer("dataset_pass_rows", torch.zeros(2, dtype=torch.long, device=self.device))
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long, device=self.device))
        self.register_buffer("balanced_seen", torch.zeros(self.num_classes, device=self.device))

    def num_strong_views(self):
        return 2

    def build_heads(self, feature_dim, num_classes):
        return {HEAD: nn.Linear(feature_dim, num_classes)}

    def losses(self, batch, model, teacher, step):
        labeled, weak, strong = self.forward_views(model, batch)
        log_prior = torch.log(self.labeled_prior).float()
        loss_x = F.cross_entropy(labeled["logits"], batch["y"]) + F.cross_entropy(labeled[HEAD] + log_prior, batch["y"])
        confidence, targets = torch.softmax(weak["logits"].detach(), dim=1).max(dim=1)
        mask = confidence.ge(self.class_threshold[targets]).float()
        loss_u = sum((F.cross_entropy(view["logits"], targets, reduction="none") * mask).mean() for view in strong)
        self.confidence[self.batch_group.gather(batch["u_index"])] = self.batch_group.gather(confidence)
        self.balanced_seen = self.balanced_seen + F.one_hot(batch["y_balanced"], self.num_classes).sum(0)
        return {"loss": loss_x + loss_u / len(strong), "mask_rate": mask.mean()}

    def balanced_labeled_batch(self):
        return "weak"

    def dataset_pass_steps(self):
        return (3,)

    def after_dataset_pass(self, outputs, model, teacher, step):
        self.dataset_pass_rows = torch.tensor([len(outputs.labeled["logits"]), len(outputs.unlabeled["logits"])],
                                              device=self.device)

    def after_optimizer_step(self, model, step):
        self.optimizer_steps = self.optimizer_steps + 1

    def unlabeled_pass_every(self):
        return self.cfg.pass_every

    def after_unlabeled_pass(self, outputs, step):
        confidence, predicted = torch.softmax(outputs["logits"], dim=1).max(dim=1)
        members = F.one_hot(predicted, self.num_classes).float()
        mean = (members * confidence[:, None]).sum(0) / members.sum(0).clamp(min=1)
        self.class_threshold = torch.where(members.sum(0) > 0, mean, self.class_threshold)
        self.passes = self.passes + 1

    def pseudo_labels_for_next_generation(self, outputs):
        confidence, predicted = torch.softmax(outputs["logits"], dim=1).max(dim=1)
        chosen = torch.argsort(confidence, descending=True, stable=True)[: int(len(confidence) * self.cfg.keep)]
        return chosen, predicted[chosen]

    def inherit(self, previous):
        self.class_threshold = previous.class_threshold.clone()
        self.inherited_passes = previous.passes.clone()

    def merge_states(self, states):
        merged = mean_of_states(states)
        # An image one replica drew and the other did not: its confidence is the one that was measured.
        merged["confidence"] = torch.stack([state["confidence"] for state in states]).max(dim=0).values
        return merged

    @classmethod
    def eval_logit_offset(cls, model, inputs):
        return model(torch.zeros_like(inputs))[HEAD][0]
'''
EVERY_HOOK_RUN = ["experiment=quickstart", "plugins=[every_hook_plugin]", "~algorithm", "algorithm.name=every_hook",
                  "train.iterations=10", "train.eval_every=5", "train.log_every=5", "train.batch_size=16",
                  "train.mu=2", "train.num_threads=1", "imwa.k=2", "imwa.episodes=1"]


@pytest.mark.slow
def test_an_external_algorithm_can_use_every_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Extra head and its evaluation, a test-time logit offset, two strong views, per-sample state at u_index,
    a periodic pass, a one-off dataset pass, a second optimiser step, a class-balanced labeled batch, a custom
    merge, generations with picks and inheritance, the context: each is seen in the run's record, and the run
    stops and resumes bitwise inside its second generation."""
    from ssl_imwa.api import load_run
    from ssl_imwa.checkpoint import read_checkpoint
    from ssl_imwa.data.transforms import normalize
    from ssl_imwa.evaluate import evaluate_checkpoint
    from tests.utils import assert_same_run

    (tmp_path / "every_hook_plugin.py").write_text(EVERY_HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        full = train_run(tmp_path, EVERY_HOOK_RUN, "full")
        train_run(tmp_path, [*EVERY_HOOK_RUN, "train.stop_at=15"], "stopped")
        stopped = train_run(tmp_path, [*EVERY_HOOK_RUN, "resume=true"], "stopped")
    finally:
        sys.modules.pop("every_hook_plugin", None)
    assert_same_run(full, stopped, "stopped in generation 2 and resumed")
    final = read_checkpoint(full / "checkpoints" / "latest.pt")
    state = final["replicas"][0]["algorithm"]
    picks = final["generation"]["pseudo_labels"]
    assert final["generation"]["index"] == 1 and len(picks["labels"]) == int(283 * 0.25)
    assert int(state["generation"]) == 1 and int(state["pseudo_labeled"]) == len(picks["labels"])
    assert int(state["passes"]) == 2 and int(state["inherited_passes"]) == 2   # after steps 5 and 10, each generation
    # generation 2: its step 3's pass over the labeled set (159 + the picks) and the unlabeled set (283); 10 steps
    assert state["dataset_pass_rows"].tolist() == [159 + len(picks["labels"]), 283]
    assert int(state["optimizer_steps"]) == 10
    assert state["balanced_seen"].min() > 0   # 10 balanced batches of 16 drawn over classes of 4 to 40 images
    drawn = int((state["confidence"] > 0).sum())
    assert 16 * 2 * 5 * 0.5 < drawn <= 283   # 5 steps of 32 unlabeled images per replica, merged by max
    for part in ("model", "algorithm"):   # the last merge gave both replicas the same
        left, right = final["replicas"][0][part], final["replicas"][1][part]
        assert all(torch.equal(left[key], right[key]) for key in left), part
    # The evaluated head, offset by its logits of a zero image, as the run's evaluation and `evaluate` read it.
    results = read_results(full)
    assert results["final"]["top1"] == evaluate_checkpoint(full, "latest")["logits_adjusted"]["top1"]
    loaded = load_run(full)
    teacher = loaded.teacher.eval()
    images = normalize(loaded.data.test_images, loaded.data.mean, loaded.data.std)
    with torch.no_grad():
        logits = teacher(images)["logits_adjusted"] - teacher(torch.zeros_like(images[:1]))["logits_adjusted"][0]
    by_hand = (logits.argmax(dim=1) == loaded.data.test_targets).double().mean().item()
    assert results["final"]["top1"] == pytest.approx(by_hand, abs=1e-12)
    assert [row["step"] for row in read_metrics(full) if row["source"] == "merged"] == [10, 20]


def test_the_walkthrough_quotes_crest_as_it_is() -> None:
    """Every line of the CReST+ walkthrough's excerpts is a line of ssl_imwa/algorithms/crest.py."""
    section = DOC.read_text().split("## Walkthrough: CReST+")[1].split("\n## ")[0]
    source = {line.rstrip() for line in (DOC.parents[1] / "ssl_imwa" / "algorithms" / "crest.py").read_text().splitlines()}
    excerpts = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(excerpts) == 5
    missing = [line for excerpt in excerpts for line in excerpt.splitlines() if line.strip() and line.rstrip() not in source]
    assert not missing, f"the walkthrough quotes lines crest.py does not have: {missing}"
