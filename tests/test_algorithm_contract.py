"""The algorithm contract of ssl_imwa/algorithm.py: one-way imports, built-ins found like plugins,
state as module buffers (strict loads, device moves) and checkpoints written before the move."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_imwa.algorithm import register_algorithm
from ssl_imwa.algorithms.acr import ACR, ACRConfig
from ssl_imwa.algorithms.daso import DASO, DASOConfig
from ssl_imwa.algorithms.fixmatch import FixMatch
from ssl_imwa.builders import build_replicas
from ssl_imwa.config import validate
from ssl_imwa.data import build_data
from ssl_imwa.distributed import Communicator, ProcessLayout
from ssl_imwa.trainer import Trainer
from tests.utils import ROOT, algorithm_context, compose_config


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_engine_never_imports_the_built_in_algorithms() -> None:
    engine = [path for path in (ROOT / "ssl_imwa").rglob("*.py") if "algorithms" not in path.parts]
    assert len(engine) > 20
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                     if name.startswith("ssl_imwa.algorithms"))
                 for path in engine}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.slow
def test_every_module_of_the_built_in_package_is_loaded_as_a_plugin() -> None:
    """In a fresh interpreter (here other tests have imported the built-ins already), the first lookup
    finds them all without any of them having been imported by name."""
    code = ("import importlib, pkgutil, sys\nimport ssl_imwa.algorithms as package\n"
            "from ssl_imwa.algorithm import list_algorithms\n"
            "assert not [m for m in sys.modules if m.startswith('ssl_imwa.algorithms.')]\n"
            "print(','.join(list_algorithms()))\n"
            "for module in pkgutil.iter_modules(package.__path__):\n"
            "    importlib.import_module(f'ssl_imwa.algorithms.{module.name}')\n"
            "print(','.join(list_algorithms()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    found_by_lookup, after_importing_every_module = result.stdout.split()
    assert found_by_lookup == after_importing_every_module
    assert {"acr", "daso", "fixmatch", "supervised"} <= set(found_by_lookup.split(","))


def daso_with_state() -> DASO:
    daso = DASO(DASOConfig(queue_size=4), algorithm_context([2, 1], 10))
    daso.queue.push(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))
    daso.pl_counts += torch.tensor([3.0, 1.0], dtype=torch.float64)
    return daso


def test_state_is_module_buffers_that_follow_the_device() -> None:
    daso = daso_with_state()
    assert set(daso.state_dict()) == {"queue.features", "queue.fill", "queue.pointer", "pl_dist", "pl_counts"}
    acr = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    assert set(acr.state_dict()) == {"estimate", "distance_sum", "distance_steps", "tau"}
    for algorithm in (daso.to("meta"), acr.to("meta")):
        assert algorithm.device.type == "meta"
        assert {tensor.device.type for tensor in algorithm.state_dict().values()} == {"meta"}


def test_a_load_is_strict_and_names_the_key() -> None:
    state = daso_with_state().state_dict()
    with pytest.raises(RuntimeError, match='Unexpected key.*"stray"'):
        DASO(DASOConfig(queue_size=4), algorithm_context([2, 1], 10)).load_state_dict({**state, "stray": torch.ones(1)})
    del state["pl_counts"]
    with pytest.raises(RuntimeError, match='Missing key.*"pl_counts"'):
        DASO(DASOConfig(queue_size=4), algorithm_context([2, 1], 10)).load_state_dict(state)
    with pytest.raises(ValueError, match="algorithm.queue_size"):
        DASO(DASOConfig(queue_size=3), algorithm_context([2, 1], 10)).load_state_dict(daso_with_state().state_dict())


def test_checkpoints_written_before_the_buffers_still_load() -> None:
    """Older checkpoints named DASO's queue tensors queue_<name> and held ACR's tau and step count as floats."""
    original = daso_with_state()
    old = {key.replace("queue.", "queue_"): value for key, value in original.state_dict().items()}
    restored = DASO(DASOConfig(queue_size=4), algorithm_context([2, 1], 10))
    restored.load_state_dict(old)
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    acr = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    acr.load_state_dict({**acr.state_dict(), "tau": 0.1 + 0.2, "distance_steps": 3.0})
    assert acr.tau.dtype == torch.float64 and acr.tau.item() == 0.1 + 0.2 and acr.distance_steps.item() == 3.0



class PassRecorder(FixMatch):
    """FixMatch that asks for a pass over the unlabeled set every 3 steps and keeps what it got."""

    def unlabeled_pass_every(self) -> int:
        return 3

    def after_unlabeled_pass(self, outputs: dict[str, torch.Tensor], step: int) -> None:
        self.passes.append((step, {key: value.clone() for key, value in outputs.items()}))


@pytest.mark.parametrize("pass_model", ["teacher", "student"])
def test_a_periodic_pass_hands_the_algorithm_every_unlabeled_image_in_index_order(pass_model: str) -> None:
    cfg = validate(compose_config(["experiment=quickstart", "train.batch_size=8", "train.mu=2", "train.num_threads=1",
                                   "train.eval_batch_size=100"]))
    data = build_data(cfg.dataset)
    single = Communicator()
    (replica,), _, _ = build_replicas(cfg, data, torch.device("cpu"), ProcessLayout(single, single, single))
    replica.algorithm = PassRecorder(replica.algorithm.cfg, replica.algorithm.context)
    replica.algorithm.unlabeled_pass_model = pass_model
    replica.algorithm.passes = []
    trainer = Trainer(cfg.train, torch.device("cpu"))
    for step in range(7):
        trainer.step(replica, step)
        if step == 5:
            model = replica.teacher.module if pass_model == "teacher" else replica.model
            training = model.training
            model.eval()
            stream = replica.stream
            # by hand: (x / 255 - mean) / std of each unlabeled image, one forward over all of them
            mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (stream.mean, stream.std))
            with torch.no_grad():
                expected = model((stream.unlabeled_images.float() / 255 - mean) / std)["logits"]
            model.train(training)
    assert [step for step, _ in replica.algorithm.passes] == [2, 5]
    logits = replica.algorithm.passes[1][1]["logits"]
    assert logits.shape == (len(replica.stream.unlabeled_images), 10) == (replica.algorithm.context.num_unlabeled, 10)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert replica.model.training and not torch.equal(replica.algorithm.passes[0][1]["logits"], logits)


def test_an_unknown_pass_model_is_refused_when_registering() -> None:
    with pytest.raises(TypeError, match="unlabeled_pass_model='ema', expected one of teacher, student"):
        register_algorithm("never_registered")(type("Bad", (FixMatch,), {"unlabeled_pass_model": "ema"}))
