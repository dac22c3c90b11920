"""DASO: blending, prototypes, histogram schedule, warm-up, BN isolation, state and merge."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_imwa.algorithm import forward_concat, get_algorithm
from ssl_imwa.algorithms.daso import (
    DASO,
    DASOConfig,
    FeatureQueue,
    blend_pseudo_labels,
    distribution_weights,
    merge_queues,
    prototype_logits,
)
from ssl_imwa.models import create_model
from tests.test_fixmatch import audit_steps, meta_batch, meta_setup
from tests.utils import (
    algorithm_context,
    assert_bitwise_equal,
    checkpoint_algorithm_state,
    checkpoint_tensors,
    logged_train_scalars,
    train_run,
)


class Passthrough(nn.Module):
    """Returns its input as both features and logits, so tests choose them exactly."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x, "logits": x}


def make_batch(x: torch.Tensor, y: list[int], u_weak: torch.Tensor, u_strong: torch.Tensor) -> dict:
    count = u_weak.shape[0]
    return {"x": x, "y": torch.tensor(y), "u_weak": u_weak, "u_strong": [u_strong], "u_index": torch.arange(count),
            "u_is_labeled": torch.zeros(count, dtype=torch.bool), "u_target": torch.full((count,), -1)}


def image_batch(generator: torch.Generator, labeled: int = 6, unlabeled: int = 8) -> dict:
    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, generator=generator)

    labels = torch.randint(0, 3, (labeled,), generator=generator).tolist()
    return make_batch(images(labeled), labels, images(unlabeled), images(unlabeled))


def test_distribution_weights_and_blend_match_hand_computation() -> None:
    # m_hat = (0.5, 0.3, 0.2), T_dist = 0.5: m^2 = (0.25, 0.09, 0.04) -> v = (1, 0.36, 0.16).
    weights = distribution_weights(torch.tensor([0.5, 0.3, 0.2]), temperature=0.5)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.36, 0.16], dtype=torch.float64))
    linear = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    semantic = torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    blended = blend_pseudo_labels(linear, semantic, weights)
    # Row 1: k' = 1, v = 0.36: 0.64 * (0.2, 0.7, 0.1) + 0.36 * (0.1, 0.1, 0.8). Row 2: k' = 0, v = 1: q itself.
    torch.testing.assert_close(blended, torch.tensor([[0.164, 0.484, 0.352], [0.2, 0.2, 0.6]]))


def test_losses_match_hand_computation() -> None:
    # Teacher features (1, 0) for class 0 and (0, 2) for class 1 become the prototypes.
    # Weak view z_w = (1, 0): cos = (1, 0); strong view z_s = (0, 1): cos = (0, 1); T_proto = 0.5.
    # q_w = softmax(2, 0); L_align = -(q_w . log_softmax(0, 2)) = log(1 + e^2) - 2 / (1 + e^2) = 1.8885222.
    # L_x = (log(1 + e^-1) + log(1 + e^-2)) / 2 = 0.2200948. m_hat is uniform, so v = 1 and p' = q_w,
    # whose maximum 0.881 is below the threshold: L_u = 0.
    algorithm = DASO(DASOConfig(warmup_steps=0, proto_temperature=0.5), algorithm_context([2, 1], 10))
    batch = make_batch(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), [0, 1], torch.tensor([[1.0, 0.0]]),
                       torch.tensor([[0.0, 1.0]]))
    out = algorithm.losses(batch, Passthrough(), Passthrough(), step=0)
    assert out["loss_align"].item() == pytest.approx(1.8885222, abs=1e-6)
    assert out["loss_x"].item() == pytest.approx(0.2200948, abs=1e-6)
    assert out["loss_u"].item() == 0.0 and out["mask_rate"].item() == 0.0
    assert out["loss"].item() == pytest.approx(1.8885222 + 0.2200948, abs=1e-6)


def test_queue_is_fifo_per_class_and_prototype_is_mean() -> None:
    queue = FeatureQueue(num_classes=2, size=3, device=torch.device("cpu"))
    queue.push(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]))
    queue.push(torch.tensor([[3.0], [4.0]]), torch.tensor([0, 0]))
    assert queue.most_recent(0, 3).flatten().tolist() == [2.0, 3.0, 4.0]
    assert queue.prototypes()[0].item() == pytest.approx(3.0)
    # More than L of a class in one push: the last L survive.
    queue.push(torch.tensor([[10.0], [20.0], [30.0], [40.0]]), torch.tensor([0, 0, 0, 0]))
    assert queue.most_recent(0, 3).flatten().tolist() == [20.0, 30.0, 40.0]
    assert queue.prototypes()[0].item() == pytest.approx(30.0)


def test_queue_keeps_exact_values_when_a_class_overflows() -> None:
    # Class 0 gets 3 rows for 2 slots: -inf is dropped, and the -0.0 written to its slot stays -0.0.
    queue = FeatureQueue(num_classes=2, size=2, device=torch.device("cpu"))
    queue.push(torch.tensor([[5.0], [6.0], [7.0]]), torch.tensor([1, 0, 0]))
    queue.push(torch.tensor([[float("-inf")], [float("nan")], [1.0], [-0.0]]), torch.tensor([0, 0, 1, 0]))
    oldest, newest = queue.most_recent(0, 2).flatten().tolist()
    assert math.isnan(oldest) and newest == 0.0 and math.copysign(1.0, newest) == -1.0
    assert queue.most_recent(1, 2).flatten().tolist() == [5.0, 1.0]
    assert queue.fill.tolist() == [2, 2] and queue.pointer.tolist() == [1, 0]


def test_unseen_class_has_zero_prototype_and_zero_cosine() -> None:
    queue = FeatureQueue(num_classes=3, size=4, device=torch.device("cpu"))
    queue.push(torch.tensor([[1.0, 1.0], [3.0, 1.0]]), torch.tensor([0, 2]))
    prototypes = queue.prototypes()
    assert prototypes[1].tolist() == [0.0, 0.0]
    cosine = prototype_logits(torch.tensor([[1.0, 0.0], [0.0, 5.0]]), prototypes, temperature=1.0)
    assert cosine[:, 1].tolist() == [0.0, 0.0]


def test_histogram_is_replaced_every_period() -> None:
    algorithm = DASO(DASOConfig(warmup_steps=100, dist_update_period=2), algorithm_context([3, 2, 1], 100))
    labeled = torch.eye(3)
    to_classes_001 = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    to_class_2 = torch.tensor([[0, 0, 5.0]] * 3)
    for step, weak in enumerate([to_classes_001, to_classes_001, to_class_2, to_class_2]):
        algorithm.losses(make_batch(labeled, [0, 1, 2], weak, weak), Passthrough(), Passthrough(), step)
        if step == 1:
            torch.testing.assert_close(algorithm.pl_dist, torch.tensor([4 / 6, 2 / 6, 0.0], dtype=torch.float64))
        if step == 2:  # mid-period: unchanged
            torch.testing.assert_close(algorithm.pl_dist, torch.tensor([4 / 6, 2 / 6, 0.0], dtype=torch.float64))
    # Accumulating would give (4, 2, 6) / 12; the refresh keeps only the last period.
    torch.testing.assert_close(algorithm.pl_dist, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_warmup_steps_accept_a_fraction_of_the_run() -> None:
    assert DASO(DASOConfig(warmup_steps=0.02), algorithm_context([3, 2, 1], 250_000)).warmup_steps == 5000


def test_warmup_is_exactly_fixmatch() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, in_channels=1)
    batch = image_batch(torch.Generator().manual_seed(1))
    daso = DASO(DASOConfig(warmup_steps=5, threshold=0.0), algorithm_context([3, 2, 1], 10))
    fixmatch_cls = get_algorithm("fixmatch")
    fixmatch = fixmatch_cls(fixmatch_cls.Config(threshold=0.0), algorithm_context([3, 2, 1], 10))
    daso_out = daso.losses(batch, copy.deepcopy(model), copy.deepcopy(model).eval(), step=4)
    fixmatch_out = fixmatch.losses(batch, copy.deepcopy(model), copy.deepcopy(model).eval(), step=4)
    assert daso_out["loss_u"].item() > 0
    for key in ("loss", "loss_x", "loss_u", "mask_rate"):
        assert torch.equal(daso_out[key], fixmatch_out[key]), key


def test_the_teacher_embeds_the_labeled_batch_in_train_mode_and_the_student_forwards_once() -> None:
    """As the official EMA model (always in train mode): queue features from the labeled batch's own BN
    statistics, the teacher's running statistics moved by that one forward, the student's untouched by it."""
    torch.manual_seed(0)
    student = create_model("small_cnn", num_classes=3, in_channels=1)
    teacher = copy.deepcopy(student).eval()
    reference_student, reference_teacher = copy.deepcopy(student), copy.deepcopy(teacher).train()
    batch = image_batch(torch.Generator().manual_seed(2))
    daso = DASO(DASOConfig(warmup_steps=0), algorithm_context([3, 2, 1], 10))
    daso.losses(batch, student, teacher, step=0)
    # The student's statistics are those of exactly one forward over (x, u_weak, u_strong).
    forward_concat(reference_student, [batch["x"], batch["u_weak"], batch["u_strong"][0]])
    for name, buffer in reference_student.named_buffers():
        assert torch.equal(dict(student.named_buffers())[name], buffer), name
    # The teacher's: one train-mode forward over x, which also gave the queued features; it is left in eval mode.
    with torch.no_grad():
        features = reference_teacher(batch["x"])["features"]
    for name, buffer in reference_teacher.named_buffers():
        assert torch.equal(dict(teacher.named_buffers())[name], buffer), name
    assert not teacher.training
    expected = FeatureQueue(3, DASOConfig().queue_size)
    expected.push(features, batch["y"])
    assert torch.equal(daso.queue.features, expected.features)


def test_state_round_trip_gives_identical_next_losses() -> None:
    torch.manual_seed(0)
    config = DASOConfig(warmup_steps=1, dist_update_period=2, queue_size=4)
    model = create_model("small_cnn", num_classes=3, in_channels=1)
    teacher = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(3)
    batches = [image_batch(generator) for _ in range(5)]
    original = DASO(config, algorithm_context([3, 2, 1], 10))
    for step in range(2):
        original.losses(batches[step], model, teacher, step)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = DASO(config, algorithm_context([3, 2, 1], 10))
    restored.load_state_dict(torch.load(buffer))
    restored_model = copy.deepcopy(model)
    for step in range(2, 5):
        expected = original.losses(batches[step], model, teacher, step)
        actual = restored.losses(batches[step], restored_model, teacher, step)
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, equal_nan=True)


def test_merge_averages_histograms_and_rebuilds_queues_from_newest_features() -> None:
    algorithm = DASO(DASOConfig(queue_size=4), algorithm_context([2, 1], 10))
    # Replica A: class 0 ring [a0, a1, a2, a3] with pointer 2, so newest first: 11, 10, 13, 12.
    state_a = {"queue.features": torch.tensor([[[10.0], [11.0], [12.0], [13.0]], [[5.0], [0.0], [0.0], [0.0]]]),
               "queue.fill": torch.tensor([4, 1]), "queue.pointer": torch.tensor([2, 1]),
               "pl_dist": torch.tensor([0.6, 0.4], dtype=torch.float64),
               "pl_counts": torch.tensor([3.0, 1.0], dtype=torch.float64)}
    # Replica B: class 0 holds 20, 21, 22 (newest 22); class 1 is empty.
    state_b = {"queue.features": torch.tensor([[[20.0], [21.0], [22.0], [0.0]], [[0.0], [0.0], [0.0], [0.0]]]),
               "queue.fill": torch.tensor([3, 0]), "queue.pointer": torch.tensor([3, 0]),
               "pl_dist": torch.tensor([0.2, 0.8], dtype=torch.float64),
               "pl_counts": torch.tensor([1.0, 5.0], dtype=torch.float64)}
    merged = algorithm.merge_states([state_a, state_b])
    torch.testing.assert_close(merged["pl_dist"], torch.tensor([0.4, 0.6], dtype=torch.float64))
    torch.testing.assert_close(merged["pl_counts"], torch.tensor([2.0, 3.0], dtype=torch.float64))
    # L/K = 2 newest per replica, oldest first, replicas interleaved: A's 10, B's 21, A's 11, B's 22.
    assert merged["queue.features"][0, :, 0].tolist() == [10.0, 21.0, 11.0, 22.0]
    assert merged["queue.fill"].tolist() == [4, 1] and merged["queue.pointer"].tolist() == [0, 1]
    assert merged["queue.features"][1, 0, 0].item() == 5.0
    algorithm.load_state_dict(merged)
    torch.testing.assert_close(algorithm.queue.prototypes(), torch.tensor([[16.0], [5.0]]))


def test_steps_never_wait_for_the_device() -> None:
    # Warm-up ends at step 3; m_hat is refreshed after steps 1 and 3.
    config = DASOConfig(warmup_steps=3, dist_update_period=2, queue_size=2)
    algorithm, model, teacher = meta_setup(DASO, config)
    algorithm.losses(meta_batch(1), model, teacher, 0)   # warm-up (the first push sizes the queue)
    steps = [1, 2, 3, 4]
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}


RUN = ["algorithm=daso", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "algorithm.warmup_steps=10", "algorithm.dist_update_period=7",
       "algorithm.queue_size=16"]


@pytest.mark.slow
def test_end_to_end_with_imwa_merges(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*RUN, "imwa.k=2", "imwa.episodes=2"])
    assert (run_dir / "results.json").is_file()
    for source in ("replica0", "replica1"):
        logged = logged_train_scalars(run_dir / "tensorboard" / source)
        for key in ("loss", "loss_x", "loss_u", "loss_align", "mask_rate"):
            assert len(logged[key]) == 6 and all(math.isfinite(value) for value in logged[key]), (source, key)
        assert logged["loss_align"][0] == 0.0 and min(logged["loss_align"][2:]) > 0.0   # warm-up ends at step 10


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = train_run(tmp_path, RUN, "uninterrupted")
    train_run(tmp_path, [*RUN, "train.stop_at=20"], "resumed")
    resumed = train_run(tmp_path, [*RUN, "resume=true"], "resumed")
    assert_bitwise_equal(checkpoint_tensors(uninterrupted), checkpoint_tensors(resumed))
    assert_bitwise_equal(checkpoint_algorithm_state(uninterrupted), checkpoint_algorithm_state(resumed))


def _merge_queues_by_class(queues: list[FeatureQueue]) -> list[list[list[float]]]:
    """Reference: per class, each replica's newest L/K entries, oldest age first, replicas in order."""
    size, replicas = queues[0].size, len(queues)
    shares = [size // replicas + (k < size % replicas) for k in range(replicas)]
    merged = []
    for cls in range(queues[0].features.shape[0]):
        recent = [queue.most_recent(cls, share).tolist() for queue, share in zip(queues, shares)]
        depth = max(len(entries) for entries in recent)
        merged.append([entries[len(entries) - age - 1] for age in reversed(range(depth))
                       for entries in recent if age < len(entries)])
    return merged


@pytest.mark.parametrize("replicas, size", [(2, 4), (3, 5), (4, 3), (5, 7)])
def test_merged_queues_equal_a_class_by_class_reference(replicas: int, size: int) -> None:
    generator = torch.Generator().manual_seed(replicas * 10 + size)
    queues = []
    for _ in range(replicas):
        queue = FeatureQueue(4, size, torch.device("cpu"))
        for _ in range(3):
            count = int(torch.randint(1, 2 * size + 2, (1,), generator=generator))
            queue.push(torch.randn(count, 3, generator=generator), torch.randint(0, 4, (count,), generator=generator))
        queues.append(queue)
    merged = merge_queues(queues)
    for cls, expected in enumerate(_merge_queues_by_class(queues)):
        assert int(merged.fill[cls]) == len(expected) and int(merged.pointer[cls]) == len(expected) % size
        assert merged.features[cls, :len(expected)].tolist() == expected
        assert not merged.features[cls, len(expected):].any()
