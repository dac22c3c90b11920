"""TWA merge on a toy 3-class problem (8x8 single-channel images, the small CNN)."""
import json
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from ssl_imwa.merge import average_tensors
from ssl_imwa.merges.twa import (
    EXTRA_LOGIT,
    Candidate,
    TWAConfig,
    build_candidates,
    stratified_halves,
    twa_merge,
)
from ssl_imwa.models import create_model

NUM_CLASSES = 3
QUICK = {"steps": 40, "batch_size": 64}  # enough for the toy problem, a fraction of the default cost


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors on shared cores: extra intra-op threads only contend (measured ~30x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a fixed random 8x8 pattern plus noise: separable, but not trivially."""
    patterns = torch.randn(NUM_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % NUM_CLASSES
    return patterns[targets] + 0.8 * torch.randn(count, 1, 8, 8, generator=generator), targets


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", NUM_CLASSES, in_channels=1, bn_momentum=0.1)


def _train(init: dict, images: torch.Tensor, targets: torch.Tensor, seed: int) -> dict:
    model = _model(0)
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(30):
        index = torch.randint(len(images), (32,), generator=generator)
        loss = F.cross_entropy(model(images[index])["logits"], targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def toy() -> dict:
    """Two good replicas from one start, as in an episode, and two bad ones: good_a with heavy noise on its
    parameters, and one trained on shifted labels (c -> c+1)."""
    images, targets = _data(300, seed=1)
    start = _model(0).state_dict()
    good_a = _train(start, images, targets, seed=1)
    good_b = _train(start, images, targets, seed=2)
    wrong = _train(start, images, (targets + 1) % NUM_CLASSES, seed=3)
    names = {name for name, _ in _model(0).named_parameters()}
    generator = torch.Generator().manual_seed(4)
    noisy = {key: value + 2 * value.std() * torch.randn(value.shape, generator=generator)
             if key in names and value.numel() > 1 else value for key, value in good_a.items()}
    return {"replicas": [{"model": state, "teacher": state} for state in (good_a, good_b, noisy)],
            "misled": [{"model": state, "teacher": state} for state in (good_a, good_b, wrong)],
            "start": {"model": start, "teacher": start},
            "val": _data(240, seed=2), "unlabeled": _data(64, seed=3)[0]}


def _halves(val: tuple[torch.Tensor, torch.Tensor]) -> tuple[tuple, tuple]:
    fit_index, accept_index = stratified_halves(val[1], seed=0)
    return (val[0][fit_index], val[1][fit_index]), (val[0][accept_index], val[1][accept_index])


def _merge(toy: dict, cfg: TWAConfig, fit: tuple, accept: tuple | None, replicas: list | None = None):
    replicas = replicas or toy["replicas"]
    candidates = build_candidates(replicas, toy["start"], cfg)
    return twa_merge(candidates, len(replicas), _model(0), "logits", fit, accept, cfg, toy["unlabeled"],
                     torch.Generator().manual_seed(0))


def _random_replicas(count: int) -> list[dict]:
    """Students and teachers that all differ, so a mix-up of the two sides would show."""
    return [{"model": _model(10 + k).state_dict(), "teacher": _model(20 + k).state_dict()} for k in range(count)]


def _assert_close_states(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert value.dtype == right[key].dtype, key
        assert torch.allclose(value, right[key], atol=1e-6), key


@pytest.mark.parametrize("parameterisation, include_start", [("simplex", False), ("affine", False), ("affine", True)])
def test_zero_steps_is_the_uniform_merge(toy: dict, parameterisation: str, include_start: bool) -> None:
    replicas = _random_replicas(3)
    cfg = TWAConfig(parameterisation=parameterisation, include_start=include_start, steps=0, accept=False)
    result = _merge(toy, cfg, toy["val"], None, replicas)
    _assert_close_states(result.student, average_tensors([state["model"] for state in replicas]))
    _assert_close_states(result.teacher, average_tensors([state["teacher"] for state in replicas]))
    assert result.coefficients == pytest.approx([1 / 3] * 3 + [0.0] * include_start, abs=1e-7)
    assert result.fit_loss_start == pytest.approx(result.fit_loss_end)


def test_simplex_extras_start_near_zero(toy: dict) -> None:
    cfg = TWAConfig(include_start=True, include_teachers=True, steps=0, accept=False)
    result = _merge(toy, cfg, toy["val"], None)
    extra = math.exp(EXTRA_LOGIT) / (3 + 4 * math.exp(EXTRA_LOGIT))
    assert result.coefficients[3:] == pytest.approx([extra] * 4)
    assert extra < 0.004


@pytest.mark.parametrize("parameterisation", ["simplex", "affine"])
def test_bad_replica_loses_weight(toy: dict, parameterisation: str) -> None:
    fit, accept = _halves(toy["val"])
    result = _merge(toy, TWAConfig(parameterisation=parameterisation, **QUICK), fit, accept)
    good_a, good_b, noisy = result.coefficients
    assert noisy < 1 / 3 - 0.15 and good_a > 1 / 3 and good_b > 1 / 3
    assert result.fit_loss_end < result.fit_loss_start
    assert result.learned_accept_bacc >= result.uniform_accept_bacc
    assert result.accepted == (result.learned_accept_bacc > result.uniform_accept_bacc)


def test_acceptance_rejects_a_merge_that_fits_the_wrong_labels(toy: dict) -> None:
    fit, accept = _halves(toy["val"])
    misleading_fit = (fit[0], (fit[1] + 1) % NUM_CLASSES)  # agrees with the wrong replica only
    result = _merge(toy, TWAConfig(**QUICK), misleading_fit, accept, toy["misled"])
    assert result.coefficients[2] > 1 / 3 + 0.15
    assert result.learned_accept_bacc < result.uniform_accept_bacc
    assert result.accepted is False
    for side in ("model", "teacher"):
        uniform = average_tensors([state[side] for state in toy["misled"]])
        merged = result.student if side == "model" else result.teacher
        assert all(torch.equal(merged[key], uniform[key]) for key in uniform)
    report = result.report()
    assert report["coefficients"] == [1 / 3] * 3 and report["learned_coefficients"] == result.coefficients


def test_layer_granularity_learns_one_vector_per_tensor(toy: dict) -> None:
    fit, accept = _halves(toy["val"])
    cfg = TWAConfig(granularity="layer", include_start=True, steps=10, accept=False)
    result = _merge(toy, cfg, fit, accept)
    names = [name for name, _ in _model(0).named_parameters()]
    table = result.coefficient_table
    assert list(table) == names and all(len(row) == 4 for row in table.values())
    assert all(sum(row) == pytest.approx(1.0) for row in table.values())
    assert result.coefficients == pytest.approx(torch.tensor(list(table.values())).mean(dim=0).tolist())
    assert len({tuple(row) for row in table.values()}) > 1  # the tensors moved independently
    assert "coefficient_table" in result.report()


def test_build_candidates_order_labels_and_pairs(toy: dict) -> None:
    replicas = _random_replicas(2)
    start = {"model": _model(30).state_dict(), "teacher": _model(31).state_dict()}
    candidates = build_candidates(replicas, start, TWAConfig(include_start=True, include_teachers=True))
    assert [c.label for c in candidates] == ["replica0", "replica1", "start", "teacher0", "teacher1"]
    pairs: list[tuple[dict, dict]] = [(r["model"], r["teacher"]) for r in replicas]
    pairs += [(start["model"], start["teacher"])] + [(r["teacher"], r["teacher"]) for r in replicas]
    assert all(isinstance(c, Candidate) and c.student is s and c.teacher is t for c, (s, t) in zip(candidates, pairs))
    assert len(build_candidates(replicas, None, TWAConfig())) == 2
    with pytest.raises(ValueError, match="include_start"):
        build_candidates(replicas, None, TWAConfig(include_start=True))


def test_report_and_labels_consumed(toy: dict) -> None:
    fit, accept = _halves(toy["val"])
    twa_v = _merge(toy, TWAConfig(steps=2), fit, accept)
    assert twa_v.labels_consumed == len(toy["val"][1])
    train_images = _data(90, seed=4)
    twa_t = _merge(toy, TWAConfig(data="twa-t", steps=2), train_images, accept)
    assert twa_t.labels_consumed == len(accept[1])
    report = json.loads(json.dumps(twa_v.report()))
    assert report["strategy"] == "twa" and report["labels"] == ["replica0", "replica1", "replica2"]
    assert report["accepted"] == twa_v.accepted and report["seconds"] > 0
    with pytest.raises(ValueError, match="accept split"):
        _merge(toy, TWAConfig(), fit, None)


def test_stratified_halves() -> None:
    targets = torch.tensor([0] * 7 + [1] * 4 + [2] * 1 + [3] * 9 + [4] * 20)[torch.randperm(41)]
    first, second = stratified_halves(targets, seed=5)
    assert set(first.tolist()).isdisjoint(second.tolist())
    assert sorted(first.tolist() + second.tolist()) == list(range(len(targets)))
    for cls in range(5):
        assert abs(int((targets[first] == cls).sum()) - int((targets[second] == cls).sum())) <= 1
    assert abs(len(first) - len(second)) <= 1
    again = stratified_halves(targets, seed=5)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    assert not torch.equal(stratified_halves(targets, seed=6)[0], first)


def test_bn_recompute_changes_running_stats_not_parameters(toy: dict) -> None:
    fit, _ = _halves(toy["val"])
    averaged = _merge(toy, TWAConfig(steps=3, accept=False), fit, None)
    recomputed = _merge(toy, TWAConfig(steps=3, accept=False, bn="recompute", bn_batches=3), fit, None)
    names = {name for name, _ in _model(0).named_parameters()}
    for before, after in ((averaged.teacher, recomputed.teacher), (averaged.student, recomputed.student)):
        assert all(torch.equal(before[key], after[key]) for key in names)
        assert not torch.allclose(before["backbone.features.1.running_mean"], after["backbone.features.1.running_mean"])
        assert torch.equal(after["backbone.features.1.num_batches_tracked"],
                           toy["replicas"][0]["teacher"]["backbone.features.1.num_batches_tracked"])
    # 64 unlabeled images < batch_size, so every BN batch is the whole set: the estimate is its statistic.
    conv = F.conv2d(toy["unlabeled"], recomputed.teacher["backbone.features.0.weight"], padding=1)
    assert torch.allclose(recomputed.teacher["backbone.features.1.running_mean"], conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(recomputed.teacher["backbone.features.1.running_var"],
                          conv.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
