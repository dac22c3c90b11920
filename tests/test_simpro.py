"""SimPro: a differential check against the official training step (LeapLabTHU/SimPro, SimPro/train.py at
aa2425d), re-implemented below as a test-only oracle and fed the same logits over four epochs; planted
faults that the check catches; the state of a two-slice data-parallel group; no host syncs; learning and
determinism of a quick-start run."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ssl_imwa.algorithm import AlgorithmContext, Batch
from ssl_imwa.algorithms import simpro
from ssl_imwa.algorithms.simpro import SimPro, SimProConfig, prior_adjustment
from tests.test_fixmatch import FixedLogits, audit_steps, meta_setup
from tests.utils import assert_same_run, read_results, train_run

LABELED_COUNTS = [30, 12, 5, 3]        # pi_l = (0.6, 0.24, 0.1, 0.06)
NUM_CLASSES = len(LABELED_COUNTS)
NUM_UNLABELED = 400
BATCH, MU = 4, 2                      # 4 labeled and 8 unlabeled images per step
EPOCH_LENGTH, EPOCHS = 3, 4
THRESHOLD = 0.7                       # below the recipe's 0.95 so that every step has masked and kept samples
# Both sides get a weak and a strong view of the labeled batch (official TransformFixMatch2; ours the
# stream's labeled strong view). The masked pseudo-label sum (official: boolean indexing; ours: a product
# with the mask, no host sync) may differ in the last float32 bits, and so may everything computed from it
# in later epochs. The planted faults below move the compared quantities by orders of magnitude more.
RTOL, ATOL = 1e-6, 1e-8
Step = dict[str, torch.Tensor]
GENUINE_CONSISTENCY = simpro.adjusted_soft_consistency   # what planted faults wrap (monkeypatch restores it)


# ----- the official computation (SimPro/train.py), line by line, as a test-only oracle -------------------

def official_compute_adjustment_by_py(py: torch.Tensor, tro: float) -> torch.Tensor:
    """train.py l. 90-93."""
    return torch.log(py**tro + 1e-12)


def official_scale_ratio(num_labeled: int, num_unlabeled: int, batch_size: int, mu: int) -> float:
    """train.py l. 420-434 and 565-568: the loaders' lengths with drop_last=True (one process)."""
    labeled_trainloader = DataLoader(range(num_labeled), batch_size=batch_size, drop_last=True)
    unlabeled_trainloader = DataLoader(range(num_unlabeled), batch_size=batch_size * mu, drop_last=True)
    return len(unlabeled_trainloader) / len(labeled_trainloader)


def official_train(steps: list[Step], cls_num_list_l: list[int], num_unlabeled: int, tau: float, ema_u: float,
                   threshold: float, eval_step: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """train.py `train()` l. 577-705 on preset logits. Per step: the priors it used, its pseudo-labels, mask,
    losses and the epoch sums after it; and the priors after the last epoch."""
    num_classes = len(cls_num_list_l)
    cls_num_list_l_t = torch.Tensor(cls_num_list_l).float()                           # l. 401
    py_l = cls_num_list_l_t / cls_num_list_l_t.sum()                                 # l. 404
    py_con = py_l                                                                     # l. 443
    py_uni = torch.ones(num_classes) / num_classes                                   # l. 444
    scale_ratio = official_scale_ratio(sum(cls_num_list_l), num_unlabeled, BATCH, MU)
    adapt_dis = py_con                                                                # l. 577
    estimated_dis = py_uni                                                            # l. 578
    records = []
    for epoch in range(len(steps) // eval_step):
        adjustment_u = official_compute_adjustment_by_py(estimated_dis, tau)         # l. 587
        adjustment = official_compute_adjustment_by_py(adapt_dis, tau)               # l. 588
        dis_unlabeled = torch.zeros(num_classes)                                     # l. 590
        count_labeled_dataset = torch.zeros(num_classes)                             # l. 591
        for batch_idx in range(eval_step):
            step = steps[epoch * eval_step + batch_idx]
            logits_l_w, logits_l_s = step["labeled"], step["labeled_strong"]
            logits_u_w, logits_u_s, logits_u_s1 = step["weak"], step["strong"], step["strong1"]
            targets_l = step["targets"]
            pseudo_label = torch.softmax(logits_u_w.detach() + adjustment_u, dim=-1)   # l. 637-639
            max_probs, _ = torch.max(pseudo_label, dim=-1)                           # l. 641
            mask = max_probs.ge(threshold)                                           # l. 642
            count_labeled_dataset += torch.bincount(targets_l, minlength=num_classes)   # l. 644-646
            dis_unlabeled += torch.sum(pseudo_label[mask], dim=0)                    # l. 648
            mask = mask.float()                                                      # l. 650
            mask_twice = torch.cat([mask, mask], dim=0)                              # l. 651
            logits_u_s_twice = torch.cat([logits_u_s, logits_u_s1], dim=0)           # l. 653
            targets_u_twice = torch.cat([pseudo_label, pseudo_label], dim=0)         # l. 654
            logits_l = torch.cat([logits_l_w, logits_l_s], dim=0)                    # l. 656
            targets_l = torch.cat([targets_l, targets_l], dim=0)                     # l. 657
            Lx = F.cross_entropy(logits_l + adjustment, targets_l, reduction="mean") / scale_ratio   # l. 659-662
            Lu = (F.cross_entropy(logits_u_s_twice + adjustment, targets_u_twice, reduction="none")
                  * mask_twice).mean()                                               # l. 664-671
            loss = Lx + Lu                                                           # l. 673
            records.append({"unlabeled_prior": estimated_dis, "training_prior": adapt_dis,
                            "pseudo-labels": pseudo_label, "mask": mask, "loss_x": Lx, "loss_u": Lu, "loss": loss,
                            "pseudo_label_mass": dis_unlabeled.clone(),
                            "labeled_count": count_labeled_dataset.clone()})
        estimated_dis_epoch = dis_unlabeled / (dis_unlabeled.sum() + 1)              # l. 688-690
        estimated_dis = estimated_dis * ema_u + (estimated_dis_epoch) * (1 - ema_u)  # l. 692-694
        count_forward = count_labeled_dataset + dis_unlabeled                       # l. 701
        adapt_dis = adapt_dis * ema_u + (count_forward / count_forward.sum()) * (1 - ema_u)   # l. 703-705
    return records, {"unlabeled_prior": estimated_dis, "training_prior": adapt_dis}


# ----- the same steps through our plugin, and the comparison -------------------------------------------

def random_steps(count: int, seed: int = 0) -> list[Step]:
    """Logits (scaled so that confidences spread around THRESHOLD) and labels for `count` steps."""
    generator = torch.Generator().manual_seed(seed)
    unlabeled = BATCH * MU

    def logits(rows: int) -> torch.Tensor:
        return 2.5 * torch.randn(rows, NUM_CLASSES, generator=generator)

    return [{"labeled": logits(BATCH), "labeled_strong": logits(BATCH), "weak": logits(unlabeled),
             "strong": logits(unlabeled),
             "strong1": logits(unlabeled), "targets": torch.randint(NUM_CLASSES, (BATCH,), generator=generator),
             "u_target": torch.randint(-1, NUM_CLASSES, (unlabeled,), generator=generator)} for _ in range(count)]


def step_batch(step: Step, rows: slice = slice(None), unlabeled_rows: slice = slice(None)
               ) -> tuple[Batch, FixedLogits]:
    """The batch layout of TrainStream.next (images are placeholders) and a model returning the step's
    logits for x, x_s, u_w, u_s1, u_s2 (in forward_concat's order), both restricted to the given rows."""
    labeled, weak = step["labeled"][rows], step["weak"][unlabeled_rows]
    labeled_strong = step["labeled_strong"][rows]
    strong, strong1 = step["strong"][unlabeled_rows], step["strong1"][unlabeled_rows]
    batch = {"x": torch.zeros(len(labeled), 1, 2, 2), "x_strong": [torch.zeros(len(labeled), 1, 2, 2)],
             "y": step["targets"][rows],
             "u_weak": torch.zeros(len(weak), 1, 2, 2), "u_strong": [torch.zeros(len(weak), 1, 2, 2)] * 2,
             "u_target": step["u_target"][unlabeled_rows]}
    return batch, FixedLogits(torch.cat([labeled, labeled_strong, weak, strong, strong1]))


def simpro_config(tau: float, momentum: float) -> SimProConfig:
    return SimProConfig(threshold=THRESHOLD, tau=tau, prior_momentum=momentum, epoch_length=EPOCH_LENGTH)


def build(config: SimProConfig, algorithm_cls: type[SimPro] = SimPro) -> SimPro:
    context = AlgorithmContext(tuple(LABELED_COUNTS), EPOCH_LENGTH * EPOCHS, num_unlabeled=NUM_UNLABELED)
    return algorithm_cls(config, context)


def recorded_pseudo_labels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (soft pseudo-labels, mask) that simpro.bayes_pseudo_labels returns from now on (it wraps
    whatever the module holds, a planted fault included)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = simpro.bayes_pseudo_labels

    def spy(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(inner(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(simpro, "bayes_pseudo_labels", spy)
    return calls


def assert_quantity(name: str, step: int, ours: torch.Tensor, official: torch.Tensor) -> None:
    torch.testing.assert_close(ours, official.to(ours.dtype), rtol=RTOL, atol=ATOL,
                               msg=lambda detail: f"step {step}, {name}: {detail}")


def compare_with_official(algorithm: SimPro, monkeypatch: pytest.MonkeyPatch, tau: float, momentum: float) -> None:
    """Run both on the same steps and compare quantity by quantity; an AssertionError names the first
    quantity and step that differ."""
    steps = random_steps(EPOCH_LENGTH * EPOCHS)
    records, final = official_train(steps, LABELED_COUNTS, NUM_UNLABELED, tau, momentum, THRESHOLD, EPOCH_LENGTH)
    pseudo_labels = recorded_pseudo_labels(monkeypatch)
    for index, (step, official) in enumerate(zip(steps, records, strict=True)):
        assert_quantity("unlabeled_prior", index, algorithm.unlabeled_prior, official["unlabeled_prior"])
        assert_quantity("training_prior", index, algorithm.training_prior, official["training_prior"])
        batch, model = step_batch(step)
        out = algorithm.losses(batch, model, model, index)
        probs, mask = pseudo_labels[-1]
        assert_quantity("pseudo-labels", index, probs, official["pseudo-labels"])
        assert torch.equal(mask, official["mask"]), f"step {index}, mask: {mask} != {official['mask']}"
        for key in ("loss_x", "loss_u", "loss"):
            assert_quantity(key, index, out[key], official[key])
        closes_epoch = (index + 1) % EPOCH_LENGTH == 0   # ours empties the sums then; official at the next start
        for key in ("pseudo_label_mass", "labeled_count"):
            expected = torch.zeros(NUM_CLASSES) if closes_epoch else official[key]
            assert_quantity(key, index, getattr(algorithm, key), expected)
    for key, value in final.items():
        assert_quantity(key, len(steps), getattr(algorithm, key), value)


RECIPE = (2.0, 0.9)   # the CIFAR-10 recipe's tau and --ema-u


@pytest.mark.parametrize(("tau", "momentum"), [RECIPE, (1.5, 0.7)])
def test_matches_the_official_step_over_four_epochs(monkeypatch: pytest.MonkeyPatch, tau: float,
                                                    momentum: float) -> None:
    compare_with_official(build(simpro_config(tau, momentum)), monkeypatch, tau, momentum)


def test_the_check_data_exercise_every_branch() -> None:
    """The steps mix kept and masked pseudo-labels, and the priors move: the comparison above is not vacuous."""
    steps = random_steps(EPOCH_LENGTH * EPOCHS)
    records, final = official_train(steps, LABELED_COUNTS, NUM_UNLABELED, *RECIPE, THRESHOLD, EPOCH_LENGTH)
    kept = [float(record["mask"].mean()) for record in records]
    assert all(0 < rate < 1 for rate in kept), kept
    assert official_scale_ratio(sum(LABELED_COUNTS), NUM_UNLABELED, BATCH, MU) == 50 / 12
    assert not torch.allclose(final["unlabeled_prior"], torch.full((NUM_CLASSES,), 1 / NUM_CLASSES), atol=1e-2)
    assert not torch.allclose(records[-1]["training_prior"], records[0]["training_prior"], atol=1e-2)


def test_the_first_epoch_is_bitwise_where_the_operations_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first M-step both read the same priors: pseudo-labels, masks and L_u are the same ops."""
    steps = random_steps(EPOCH_LENGTH)
    records, _ = official_train(steps, LABELED_COUNTS, NUM_UNLABELED, *RECIPE, THRESHOLD, EPOCH_LENGTH)
    algorithm = build(simpro_config(*RECIPE))
    pseudo_labels = recorded_pseudo_labels(monkeypatch)
    for index, (step, official) in enumerate(zip(steps, records, strict=True)):
        batch, model = step_batch(step)
        out = algorithm.losses(batch, model, model, index)
        assert torch.equal(pseudo_labels[-1][0], official["pseudo-labels"])
        assert torch.equal(out["loss_u"], official["loss_u"])


# ----- planted faults: each plausible bug must make the comparison fail --------------------------------

class PriorUpdatedBeforePseudoLabels(SimPro):
    """Fault: the epoch's M-step runs before its last step's E-step (that step then counts toward the next epoch)."""

    def losses(self, batch: Batch, model: torch.nn.Module, teacher: torch.nn.Module, step: int
               ) -> dict[str, torch.Tensor]:
        closes_epoch = (step + 1) % self.epoch_length == 0
        if closes_epoch:
            self.maximization_step()
        return super().losses(batch, model, teacher, step - 1 if closes_epoch else step)


class PriorUpdatedEveryStep(SimPro):
    """Fault: the M-step after every step (an EMA per step instead of per epoch)."""

    def losses(self, batch: Batch, model: torch.nn.Module, teacher: torch.nn.Module, step: int
               ) -> dict[str, torch.Tensor]:
        return super().losses(batch, model, teacher, self.epoch_length - 1)


class LabeledLossNotScaled(SimPro):
    """Fault: L_x without the official division by the loaders' length ratio."""

    def labeled_loss_divisor(self, batch: Batch) -> float:
        return 1.0


class LabeledStrongViewLeftOut(SimPro):
    """Fault: L_x over the labeled weak view alone (the forward still sees the strong one)."""

    def forward_all_views(self, model: torch.nn.Module, batch: Batch) -> tuple[list, dict, list]:
        labeled, weak, strong = super().forward_all_views(model, batch)
        return labeled[:1], weak, strong


class MassOfAllPseudoLabels(SimPro):
    """Fault: the epoch sum takes every pseudo-label, not only the confident ones."""

    def accumulate(self, labels: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> None:
        super().accumulate(labels, probs, torch.ones_like(mask))


def debiased_sign(weak_logits: torch.Tensor, unlabeled_adjustment: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fault: the prior subtracted (DebiasPL's counterfactual sign) instead of added (Bayes' rule)."""
    probs = torch.softmax(weak_logits.detach() - unlabeled_adjustment, dim=-1)
    return probs, probs.max(dim=-1).values.ge(threshold).float()


def hard_targets(strong_logits: list[torch.Tensor], adjustment: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Fault: FixMatch's one-hot argmax target instead of the official soft pseudo-label."""
    one_hot = F.one_hot(targets.argmax(dim=-1), targets.shape[-1]).float()
    return GENUINE_CONSISTENCY(strong_logits, adjustment, one_hot, mask)


def normalised_unlabeled_prior(prior: torch.Tensor, mass: torch.Tensor, momentum: float) -> torch.Tensor:
    """Fault: s / sum(s) instead of the official s / (sum(s) + 1)."""
    return prior * momentum + (mass / mass.sum()) * (1 - momentum)


def unlabeled_loss_by_unlabeled_prior(algorithm: SimPro) -> Callable[..., torch.Tensor]:
    """Fault: L_u adjusted by the unlabeled estimate pi_u instead of pi, the prior of all training samples."""
    def faulty(strong_logits: list[torch.Tensor], adjustment: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        return GENUINE_CONSISTENCY(strong_logits, prior_adjustment(algorithm.unlabeled_prior, algorithm.cfg.tau), targets, mask)

    return faulty


SUBCLASS_FAULTS = {
    "prior updated before pseudo-labelling": (PriorUpdatedBeforePseudoLabels, "step 2, pseudo-labels"),
    "prior updated every step": (PriorUpdatedEveryStep, "step 0, pseudo_label_mass"),   # emptied at once
    "labeled loss not scaled": (LabeledLossNotScaled, "step 0, loss_x"),
    "labeled strong view left out": (LabeledStrongViewLeftOut, "step 0, loss_x"),
    "unconfident pseudo-labels counted": (MassOfAllPseudoLabels, "step 0, pseudo_label_mass"),
}
FUNCTION_FAULTS = {
    # pi_u starts uniform, a constant shift that the softmax ignores: the sign shows from the second epoch on.
    "prior subtracted": ("bayes_pseudo_labels", lambda _: debiased_sign, "step 3, pseudo-labels"),
    "hard pseudo-labels": ("adjusted_soft_consistency", lambda _: hard_targets, "step 0, loss_u"),
    "no + 1 in the unlabeled prior": ("unlabeled_prior_step", lambda _: normalised_unlabeled_prior,
                                      "step 3, unlabeled_prior"),
    "L_u adjusted by pi_u": ("adjusted_soft_consistency", unlabeled_loss_by_unlabeled_prior, "step 0, loss_u"),
}


@pytest.mark.parametrize("fault", list(SUBCLASS_FAULTS))
def test_the_check_catches_a_planted_fault_in_a_method(monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    algorithm_cls, where = SUBCLASS_FAULTS[fault]
    with pytest.raises(AssertionError, match=where):
        compare_with_official(build(simpro_config(*RECIPE), algorithm_cls), monkeypatch, *RECIPE)


@pytest.mark.parametrize("fault", list(FUNCTION_FAULTS))
def test_the_check_catches_a_planted_fault_in_a_function(monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    name, make_fault, where = FUNCTION_FAULTS[fault]
    algorithm = build(simpro_config(*RECIPE))
    monkeypatch.setattr(simpro, name, make_fault(algorithm))
    with pytest.raises(AssertionError, match=where):
        compare_with_official(algorithm, monkeypatch, *RECIPE)


# ----- data parallelism: two slices of each batch in two threads keep the state of one process ---------

class ThreadGroup:
    """A data-parallel group of two threads: gather and sum exchange the slices' tensors through shared slots."""

    def __init__(self, slots: list[Any], barrier: threading.Barrier, rank: int) -> None:
        self.slots, self.barrier, self.rank, self.world_size = slots, barrier, rank, 2

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.rank] = tensor
        self.barrier.wait()
        pieces = list(self.slots)
        self.barrier.wait()   # neither thread overwrites a slot before both have read
        return pieces

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(tensor))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        first, second = self._exchange(tensor)
        return first + second


def run_slice(algorithm: SimPro, steps: list[Step], rank: int, errors: list[BaseException]) -> None:
    """Train one slice (rank 0: the first half of every batch) through all steps."""
    labeled, unlabeled = BATCH // 2, BATCH * MU // 2
    rows, unlabeled_rows = slice(rank * labeled, (rank + 1) * labeled), slice(rank * unlabeled, (rank + 1) * unlabeled)
    try:
        for index, step in enumerate(steps):
            batch, model = step_batch(step, rows, unlabeled_rows)
            algorithm.losses(batch, model, model, index)
    except BaseException as error:   # reported by the main thread; the other thread must not wait
        errors.append(error)
        algorithm.batch_group.barrier.abort()
        raise


def test_two_slices_keep_bitwise_the_state_of_one_process() -> None:
    steps = random_steps(2 * EPOCH_LENGTH + 1)   # across two M-steps and into a third epoch
    whole = build(simpro_config(*RECIPE))
    for index, step in enumerate(steps):
        batch, model = step_batch(step)
        whole.losses(batch, model, model, index)
    slots: list[Any] = [None, None]
    barrier = threading.Barrier(2, timeout=60)
    parts, errors = [build(simpro_config(*RECIPE)) for _ in range(2)], []
    for rank, part in enumerate(parts):
        part.batch_group = ThreadGroup(slots, barrier, rank)
    threads = [threading.Thread(target=run_slice, args=(part, steps, rank, errors)) for rank, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for part in parts:
        for key, value in whole.state_dict().items():
            assert torch.equal(part.state_dict()[key], value), key
    assert whole.pseudo_label_mass.sum() > 0   # the third epoch's sums, and the priors moved:
    assert not torch.equal(whole.unlabeled_prior, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    batch, _ = step_batch(steps[0], slice(0, BATCH // 2), slice(0, BATCH * MU // 2))
    assert parts[0].labeled_loss_divisor(batch) == whole.labeled_loss_divisor(step_batch(steps[0])[0]) == 50 / 12


# ----- the rest of the contract ---------------------------------------------------------------------------

def test_loader_length_ratio_counts_a_short_set_as_one_batch() -> None:
    assert simpro.loader_length_ratio(400, 8, 50, 4) == official_scale_ratio(50, 400, 4, 2)
    assert simpro.loader_length_ratio(5, 8, 50, 4) == 1 / 12   # the official code would have no unlabeled batch


def test_initial_priors_are_the_official_ones() -> None:
    algorithm = build(SimProConfig())
    counts = torch.Tensor(LABELED_COUNTS).float()
    assert torch.equal(algorithm.training_prior, counts / counts.sum())
    assert torch.equal(algorithm.unlabeled_prior, torch.ones(NUM_CLASSES) / NUM_CLASSES)
    assert algorithm.unlabeled_prior.dtype == algorithm.training_prior.dtype == torch.float32


@pytest.mark.parametrize(("key", "value"), [("tau", -1.0), ("prior_momentum", 1.5), ("epoch_length", 0),
                                            ("threshold", 1.2)])
def test_validation_names_the_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        SimProConfig(**{key: value}).validate()


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(SimPro, SimProConfig(epoch_length=2))
    steps = [0, 1, 2, 3]   # M-steps after 1 and 3
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.unlabeled_prior.device == torch.device("meta")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    # train.mu=2: the recipe's mu=8 with two strong views makes a step 3.5x the cost (217 s for the quick start)
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=simpro", "train.num_threads=1", "train.mu=2"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1


@pytest.mark.slow
def test_a_run_is_deterministic(tmp_path: Path) -> None:
    overrides = ["experiment=quickstart", "algorithm=simpro", "train.num_threads=1", "train.iterations=12",
                 "train.eval_every=6", "train.batch_size=16", "train.mu=2", "algorithm.epoch_length=4"]
    first, second = train_run(tmp_path, overrides, "first"), train_run(tmp_path, overrides, "second")
    assert_same_run(first, second)
