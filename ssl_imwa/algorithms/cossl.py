"""CoSSL on FixMatch (Fan, Dai, Kukleva & Schiele, CVPR 2022, "CoSSL: Co-Learning of Representation and
Classifier for Imbalanced Semi-Supervised Learning").

A classifier trained on long-tailed data favours the head classes even where the features separate the tail
ones. CoSSL decouples the two: the backbone and the standard head learn with FixMatch, while a second linear
head on the same features, the teacher classifier, learns from class-balanced labeled batches of the EMA
model's features, enhanced for the tail classes (TFE: a labeled feature of class c is mixed with an unlabeled
one, lambda x + (1 - lambda) u with lambda ~ U(max_lam, 1), with probability (N_max - N_c) / N_max). The
teacher classifier is what is evaluated. It starts after a warm-up of plain FixMatch, from a classifier
trained once on the EMA model's features of the whole training set: the labeled features plus, for every
class, N_max - N_c synthetic ones that mix its labeled features with the features of the other images most
likely to be of it (Beta(0.75, 0.75) weights), with Adam and an EMA of its weights.

This follows USB (semilearn 0.3.2, imb_algorithms/cossl: cossl.py, utils.py); the official code is
YUE-FAN/CoSSL (train_cifar_fix_cossl.py, utils/tfe_init.py). Deliberate differences from USB, each documented
where it is made (and in docs/algorithms.md):
- a feature is enhanced with its own class's probability (official); USB reads `mixup_prob[label.argmax()]`
  with integer labels, i.e. class 0's probability, 0, so its co-learning never mixes;
- the EMA model computes the TFE features in eval mode (official `ema_model.eval()`); USB's ema_model is never
  put in eval mode, so its BN normalises each TFE batch by the batch's own statistics;
- the warm-up's pass reads the training images unaugmented (USB: the labeled set weakly augmented, the
  unlabeled set's features from a strong view and its probabilities from a weak one);
- every random number comes from generators seeded by (run seed, step), not the global generators;
- the unlabeled features mixed in come from the step's own strong views (USB: a loader of its own).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.sgd import sgd

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    DatasetPass,
    StepCount,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.abc import step_seed
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    confident_pseudo_labels,
    consistency_outputs,
    masked_consistency,
)
from ssl_imwa.models.classifier import DerivedHead
from ssl_imwa.validation import expect_choice, expect_range

TEACHER_HEAD = "logits_tfe"     # USB's CoSSL_Net.teacher_classifier, its output key 'logits_tfe'
EVAL_HEAD = "logits_cossl"      # what USB's CoSSL.evaluate reads: 'logits' before the warm-up's end, 'logits_tfe' after
TFE_BETA = 0.75                 # the warm-up's Beta(0.75, 0.75) mixing weights (USB utils.TFE, official the same)
TFE_VIEWS = ("weak", "strong")
PSEUDO_LABEL_SOURCES = ("standard", "teacher")


@dataclass
class CoSSLConfig(USBFixMatchConfig):
    name: str = "cossl"
    # Steps (or a fraction of train.iterations) of plain FixMatch before the classifier warm-up: USB's CIFAR-10-LT
    # recipe cossl_warm_epoch 200 of its 256 epochs (204,800 of 262,144 steps, 0.78125); the official code
    # starts from a FixMatch checkpoint of 400 of 500 epochs.
    warmup: StepCount = 0.78125
    max_lam: float = 0.6              # TFE's lambda ~ U(max_lam, 1) in co-learning (USB cossl_max_lam; official --max_lam)
    tfe_augment: str = "strong"       # the class-balanced labeled batch's augmentation (USB cossl_tfe_augment)
    # USB's second optimiser of the teacher classifier (its tfe_optimizer: SGD, Nesterov, no decay on the bias),
    # stepped after the main one on the same gradient (the main optimiser holds the teacher classifier too).
    teacher_lr: float = 0.02          # USB cossl_tfe_warm_lr
    teacher_momentum: float = 0.9     # USB momentum
    teacher_weight_decay: float = 5e-4   # USB cossl_tfe_warm_wd
    # The classifier warm-up (USB utils.classifier_warmup): epochs of epoch_steps Adam steps over the features.
    classifier_epochs: int = 10       # USB cossl_tfe_warm_epoch
    classifier_epoch_steps: int = 1024   # USB num_eval_iter (its classifier_train's val_iteration)
    classifier_batch_size: int = 64   # USB cossl_tfe_warm_bs
    classifier_lr: float = 1e-3       # USB: Adam(lr=1e-3), fixed in its code (official --lr_tfe 0.002)
    classifier_weight_decay: float = 5e-4   # USB cossl_tfe_warm_wd (Adam's L2 on the weight, not the bias)
    classifier_ema_decay: float = 0.999     # USB cossl_tfe_warm_ema_decay
    # EMA updates per Adam step: USB's WeightEMA walks the net's state_dict, which holds the classifier twice
    # (CoSSL_Net registers the backbone's classifier under a second name), so it averages twice per step (an
    # effective decay of 0.999^2); the official code's once.
    classifier_ema_updates: int = 2
    # The weak-view pseudo-labels of FixMatch: the standard head's (USB) or, after the warm-up, the teacher
    # classifier's on the EMA model's features (official train_cifar_fix_cossl.py).
    pseudo_labels: str = "standard"

    def validate(self) -> None:
        super().validate()
        resolve_steps(self.warmup, 1, "algorithm.warmup")
        expect_range("algorithm.max_lam", self.max_lam, 0, 1)
        expect_choice("algorithm.tfe_augment", self.tfe_augment, TFE_VIEWS)
        expect_choice("algorithm.pseudo_labels", self.pseudo_labels, PSEUDO_LABEL_SOURCES)
        for key in ("teacher_lr", "teacher_weight_decay", "classifier_lr", "classifier_weight_decay"):
            expect_range(f"algorithm.{key}", getattr(self, key), 0)
        expect_range("algorithm.teacher_momentum", self.teacher_momentum, 0, 1, high_open=True)
        expect_range("algorithm.classifier_ema_decay", self.classifier_ema_decay, 0, 1)
        for key in ("classifier_epochs", "classifier_epoch_steps", "classifier_batch_size", "classifier_ema_updates"):
            expect_range(f"algorithm.{key}", getattr(self, key), 1)


class TeacherClassifier(nn.Linear):
    """The teacher classifier (USB's CoSSL_Net.teacher_classifier), with the momentum of its second optimiser as
    buffers: they travel with the model (checkpoints); an IMWA merge treats them per `imwa.momentum`
    (`CoSSL.momentum_buffers`).

    Zero-initialised: until the warm-up's end it gets an exactly zero gradient, so neither optimiser moves it nor
    builds momentum (USB: no gradient at all), and the classifier warm-up then writes it."""

    momentum_weight: torch.Tensor
    momentum_bias: torch.Tensor

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__(feature_dim, num_classes)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.register_buffer("momentum_weight", torch.zeros_like(self.weight))
        self.register_buffer("momentum_bias", torch.zeros_like(self.bias))


class EvaluatedHead(DerivedHead):
    """The evaluated head: the standard head's logits until the classifier warm-up has run, the teacher
    classifier's after (USB's CoSSL.evaluate switches on its epoch). The flag is a model buffer (copied to the
    EMA teacher, kept by checkpoints and merges), so every evaluation, `load_run` and TWA read the right head."""

    switched: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("switched", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(self.switched.bool(), outputs[TEACHER_HEAD], outputs["logits"])


def tail_mixing_probability(counts: Sequence[int]) -> torch.Tensor:
    """(N_max - N_c) / N_max per class in float64 (USB's mixup_prob, the official tfe_prob): 0 for the head class,
    near 1 for the rarest."""
    largest = max(counts)
    return torch.tensor([(largest - count) / largest for count in counts], dtype=torch.float64)


def mix_features(labeled: torch.Tensor, partners: torch.Tensor, uniforms: torch.Tensor, lambdas: torch.Tensor,
                 probability: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TFE in co-learning: row i becomes lambda_i x_i + (1 - lambda_i) u_i where uniforms_i < probability_i, else
    stays x_i. Returns (features, float 0/1 mask of the mixed rows).

    USB's arithmetic: lambda (drawn in float64) is rounded to float32 and 1 - lambda taken in float32."""
    mixed = uniforms < probability
    weight = lambdas.float()[:, None]
    blended = weight * labeled + (1 - weight) * partners
    return torch.where(mixed[:, None], blended, labeled), mixed.float()


@dataclass
class WarmupDraws:
    """Every random number of one classifier warm-up, in USB's order of use. USB draws them from the global
    generators; here from generators seeded by (run seed, step), so a resume and every data-parallel process
    draw the same."""

    partner_rows: dict[int, np.ndarray]   # class -> rows of its labeled features to enhance (USB np.random.choice)
    lambdas: dict[int, np.ndarray]        # class -> their Beta(0.75, 0.75) weights (USB np.random.beta)
    weight: torch.Tensor                  # the fresh classifier, as nn.Linear.reset_parameters draws it
    bias: torch.Tensor
    permutations: list[torch.Tensor]      # the feature set's orders, one per pass of USB's shuffling loader


def warmup_generators(key: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """A NumPy generator (the enhancement draws) and a CPU torch generator (initialisation, orders) for the
    warm-up run at `step` of a run keyed `key`."""
    tfe, orders = np.random.SeedSequence([key & ((1 << 64) - 1), step]).spawn(2)
    seed = int(orders.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return np.random.Generator(np.random.PCG64(tfe)), torch.Generator().manual_seed(seed)


def warmup_draws(key: int, step: int, counts: Sequence[int], feature_dim: int, cfg: CoSSLConfig) -> WarmupDraws:
    """The draws of the warm-up at `step`: per class below N_max, its N_max - N_c rows and weights; the
    classifier's initialisation; as many orders of the C * N_max features as the Adam steps use."""
    tfe, generator = warmup_generators(key, step)
    largest = max(counts)
    rows, lambdas = {}, {}
    for cls, count in enumerate(counts):
        if count < largest:
            rows[cls] = tfe.integers(0, count, size=largest - count)
            lambdas[cls] = tfe.beta(TFE_BETA, TFE_BETA, size=largest - count)
    weight, bias = torch.empty(len(counts), feature_dim), torch.empty(len(counts))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)   # nn.Linear.reset_parameters
    bound = 1 / math.sqrt(feature_dim)
    nn.init.uniform_(bias, -bound, bound, generator=generator)
    num_features = len(counts) * largest
    per_order = batches_per_order(num_features, cfg.classifier_batch_size)
    orders = cfg.classifier_epochs * math.ceil(cfg.classifier_epoch_steps / per_order)
    permutations = [torch.randperm(num_features, generator=generator) for _ in range(orders)]
    return WarmupDraws(rows, lambdas, weight, bias, permutations)


def batches_per_order(num_features: int, batch_size: int) -> int:
    """Full batches in one order of the feature set (USB's loader drops the last partial one)."""
    if num_features < batch_size:
        raise ValueError(f"algorithm.classifier_batch_size={batch_size}: the classifier warm-up has only "
                         f"{num_features} features (classes x the largest labeled count); use at most that")
    return num_features // batch_size


def feature_batches(permutations: list[torch.Tensor], batch_size: int, epochs: int, steps: int
                    ) -> Iterator[torch.Tensor]:
    """The warm-up's batches as USB's classifier_train takes them: every epoch starts a new order, an order that
    runs out mid-epoch is replaced by the next, and the last partial batch of an order is dropped."""
    orders = iter(permutations)
    per_order = batches_per_order(len(permutations[0]), batch_size)
    for _ in range(epochs):
        order, used = next(orders), 0
        for _ in range(steps):
            if used == per_order:
                order, used = next(orders), 0
            yield order[used * batch_size:(used + 1) * batch_size]
            used += 1


def imprinted_weights(features: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """USB's weight_imprint: each class's mean labeled feature, L2-normalised ([C, d]); `classes` on the host."""
    rows = []
    for cls in range(num_classes):
        mean = features.index_select(0, members(classes, cls, features.device)).mean(0)
        rows.append(mean / mean.norm(p=2))
    return torch.stack(rows)


def members(classes: torch.Tensor, cls: int, device: torch.device) -> torch.Tensor:
    """The labeled rows of class `cls` in index order (from the host classes: no device read), on `device`."""
    return torch.nonzero(classes == cls).flatten().to(device)


def enhanced_features(labeled: torch.Tensor, classes: torch.Tensor, unlabeled: torch.Tensor, draws: WarmupDraws,
                      num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """USB's TFE: the labeled features, then per class below N_max its synthetic ones, with one-hot targets.

    A synthetic feature of class c is l x + (1 - l) o: x a drawn labeled feature of c, o the k-th of the other
    images (the labeled ones of other classes in class order, then every unlabeled one) by their imprinted
    classifier's probability of c, descending (ties in index order: a stable sort; USB's sort is not stable)."""
    device = labeled.device
    imprint = imprinted_weights(labeled, classes, num_classes)
    labeled_probs = torch.softmax(F.linear(labeled, imprint), dim=1)
    unlabeled_probs = torch.softmax(F.linear(unlabeled, imprint), dim=1)
    features, targets = [labeled], [classes.to(device)]
    for cls, rows in draws.partner_rows.items():
        others = torch.cat([members(classes, other, device) for other in range(num_classes) if other != cls])
        candidates = torch.cat([labeled.index_select(0, others), unlabeled])
        scores = torch.cat([labeled_probs.index_select(0, others)[:, cls], unlabeled_probs[:, cls]])
        order = torch.sort(scores, descending=True, stable=True).indices[:len(rows)]
        chosen = labeled.index_select(0, members(classes, cls, device)).index_select(0, torch.as_tensor(rows).to(device))
        lambdas = torch.as_tensor(draws.lambdas[cls])
        # USB multiplies by NumPy float64 scalars, which PyTorch rounds to float32 first: l and (1 - l) in float64.
        weight, rest = lambdas.float().to(device)[:, None], (1 - lambdas).float().to(device)[:, None]
        features.append(weight * chosen + rest * candidates.index_select(0, order))
        targets.append(torch.full((len(rows),), cls, dtype=torch.long, device=device))
    classes = torch.cat(targets)
    one_hot = torch.zeros(len(classes), num_classes, device=device).scatter_(1, classes.view(-1, 1), 1.0)
    return torch.cat(features), one_hot


def train_classifier(features: torch.Tensor, targets: torch.Tensor, draws: WarmupDraws, cfg: CoSSLConfig
                     ) -> tuple[torch.Tensor, ...]:
    """USB's classifier_train epochs on the enhanced features: a fresh linear classifier, Adam on the soft-target
    cross-entropy (L2 on the weight only), an EMA of its weights after every step (USB's WeightEMA, applied
    `classifier_ema_updates` times). Returns (weight, bias, EMA weight, EMA bias)."""
    device = features.device
    weight = draws.weight.to(device, copy=True).requires_grad_()
    bias = draws.bias.to(device, copy=True).requires_grad_()
    averages = [weight.detach().clone(), bias.detach().clone()]
    optimizer = torch.optim.Adam([{"params": [weight], "weight_decay": cfg.classifier_weight_decay},
                                  {"params": [bias], "weight_decay": 0.0}], lr=cfg.classifier_lr)
    decay = cfg.classifier_ema_decay
    batches = torch.stack(list(feature_batches(draws.permutations, cfg.classifier_batch_size, cfg.classifier_epochs,
                                               cfg.classifier_epoch_steps))).to(device)
    with torch.enable_grad():
        for index in batches:
            logits = F.linear(features.index_select(0, index), weight, bias)
            loss = (-F.log_softmax(logits, dim=1) * targets.index_select(0, index)).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for _ in range(cfg.classifier_ema_updates):
                    for average, value in zip(averages, (weight, bias), strict=True):
                        average.mul_(decay)
                        average.add_(value * (1.0 - decay))
    return weight.detach(), bias.detach(), *averages


def student_head(model: nn.Module) -> TeacherClassifier:
    """The student's teacher classifier (through a DistributedDataParallel wrapper where there is one)."""
    return getattr(model, "module", model).heads[TEACHER_HEAD]


@register_algorithm("cossl")
class CoSSL(Algorithm):
    """No checkpointed state of its own: the teacher classifier, its second optimiser's momentum and the
    evaluated head's switch are the model's (the EMA teacher's classifier is the EMA of the student's, as USB's
    EMA of its whole net); the mixing probabilities derive from the labeled counts, and the draws from (run
    seed, step). So an IMWA merge averages the classifiers with the models, merges their momentum per
    `imwa.momentum`, keeps replica 0's switch (an integer buffer: every replica switches at the same step), and
    `merge_states` has nothing to merge; a data-parallel group needs no reduction (the slices'
    teacher-classifier gradients are averaged by DDP, and each process draws the whole batch's numbers and
    keeps its rows).
    """

    Config = CoSSLConfig
    cfg: CoSSLConfig
    eval_head = EVAL_HEAD

    mixing_probability: torch.Tensor

    def __init__(self, cfg: CoSSLConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        if min(context.labeled_counts) < 1:
            raise ValueError(f"algorithm=cossl needs a labeled image of every class (labeled counts "
                             f"{list(context.labeled_counts)}): its warm-up imprints and enhances every class")
        self.warmup = resolve_steps(cfg.warmup, self.total_steps, "algorithm.warmup")
        probability = tail_mixing_probability(context.labeled_counts)
        self.register_buffer("mixing_probability", probability.to(self.device), persistent=False)
        # The run's seed: ssl_imwa.run seeds every process with it before building algorithms (as ABC's key).
        self.key = torch.initial_seed()

    def build_heads(self, feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {TEACHER_HEAD: TeacherClassifier(feature_dim, num_classes), EVAL_HEAD: EvaluatedHead()}

    def momentum_buffers(self, model: nn.Module) -> list[str]:
        """The second optimiser's momentum, which the teacher classifier carries as buffers."""
        return [f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, TeacherClassifier)
                for name in ("momentum_weight", "momentum_bias")]

    def balanced_labeled_batch(self) -> str | None:
        return self.cfg.tfe_augment

    def dataset_pass_steps(self) -> tuple[int, ...]:
        """The classifier warm-up at the start of step `warmup` (USB: before_train_epoch of epoch warm_epoch)."""
        return (self.warmup,)

    def after_dataset_pass(self, outputs: DatasetPass, model: nn.Module, teacher: nn.Module, step: int) -> None:
        """USB's classifier_warmup from the EMA teacher's features: the trained classifier becomes the student's
        teacher classifier, its EMA the EMA teacher's, and both models switch their evaluated head."""
        labeled, unlabeled = outputs.labeled["features"], outputs.unlabeled["features"]
        draws = warmup_draws(self.key, step, self.context.labeled_counts, labeled.shape[1], self.cfg)
        features, targets = enhanced_features(labeled, outputs.labeled_targets, unlabeled, draws, self.num_classes)
        weight, bias, average_weight, average_bias = train_classifier(features, targets, draws, self.cfg)
        with torch.no_grad():
            for module, (new_weight, new_bias) in ((model, (weight, bias)), (teacher, (average_weight, average_bias))):
                head = student_head(module)
                head.weight.copy_(new_weight)
                head.bias.copy_(new_bias)
                evaluated_head_switch(module).fill_(1)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        labels, mask, _ = confident_pseudo_labels(self.pseudo_label_logits(weak, batch, model, teacher, step),
                                                  self.cfg.threshold)
        loss_u = masked_consistency(strong["logits"], labels, mask)
        outputs = consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"])
        if step < self.warmup:
            # USB leaves the teacher classifier out until the warm-up's end (no gradient). Here it is in the loss with
            # weight 0, so DistributedDataParallel sees every parameter used; the zero-initialised classifier then
            # gets an exactly zero gradient and stays zero, with zero momentum in both optimisers.
            zero = 0.0 * labeled[TEACHER_HEAD].sum()
            return {**outputs, "loss": outputs["loss"] + zero, "loss_teacher": zero.detach(),
                    "tfe_mix_rate": zero.detach()}
        loss_teacher, mixed = self.teacher_loss(batch, model, teacher, step)
        return {**outputs, "loss": outputs["loss"] + loss_teacher, "loss_teacher": loss_teacher.detach(),
                "tfe_mix_rate": mixed.mean()}

    def pseudo_label_logits(self, weak: dict[str, torch.Tensor], batch: Batch, model: nn.Module, teacher: nn.Module,
                            step: int) -> torch.Tensor:
        """The weak-view logits FixMatch thresholds: the standard head's (USB), or after the warm-up with
        pseudo_labels=teacher the student's teacher classifier on the EMA model's features (official)."""
        if self.cfg.pseudo_labels == "standard" or step < self.warmup:
            return weak["logits"]
        with torch.no_grad():
            return student_head(model)(teacher(batch["u_weak"])["features"].float())

    def teacher_loss(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """USB's co-learning term: cross-entropy of the student's teacher classifier on the EMA model's features of
        the class-balanced labeled batch, tail-enhanced with those of unlabeled strong views. (loss, mixed mask)"""
        labels = batch["y_balanced"]
        rows = labels.shape[0]
        # Unlabeled row mu * r partners labeled row r: a data-parallel slice pairs the rows one process would.
        stride = batch["u_strong"][0].shape[0] // batch["x"].shape[0]
        with torch.no_grad():
            # The EMA model in eval mode (official); USB's ema_model is in train mode, its BN on batch statistics.
            labeled = teacher(batch["x_balanced"])["features"].float()
            partners = teacher(batch["u_strong"][0][::stride][:rows])["features"].float()
            uniforms, lambdas = self.mixing_draws(step, rows)
            # The row's own class's probability (official); USB indexes mixup_prob by label.argmax() of an integer
            # label, always 0: class 0's probability, 0, so its rows are never mixed.
            features, mixed = mix_features(labeled, partners, uniforms, lambdas, self.mixing_probability[labels])
        logits = student_head(model)(features)
        return F.cross_entropy(logits.float(), labels), mixed

    def mixing_draws(self, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This slice's float64 uniforms (mix or not; USB random.random()) and lambdas ~ U(max_lam, 1) (USB
        np.random.uniform) at `step`. Every process draws the whole batch's from (run seed, step) on the device
        and keeps its rows, as ABC's draws."""
        rank, world = self.batch_group.rank, self.batch_group.world_size
        device = self.device
        generator = torch.Generator(device=torch.device("cpu") if device.type == "meta" else device)
        generator.manual_seed(step_seed(self.key, step))
        draws = torch.rand(2 * world * rows, generator=generator, dtype=torch.float64, device=device)
        uniforms, raw = draws.view(2, world * rows)[:, rank * rows:(rank + 1) * rows]
        low = self.cfg.max_lam
        return uniforms, low + (1.0 - low) * raw

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """USB's tfe_optimizer.step() after the main step, from the warm-up's end on (see `nesterov_step`)."""
        if step >= self.warmup:
            nesterov_step(student_head(model), self.cfg)


def evaluated_head_switch(model: nn.Module) -> torch.Tensor:
    """The `switched` flag of a model's evaluated head."""
    return getattr(model, "module", model).heads[EVAL_HEAD].switched


@torch.no_grad()
def nesterov_step(head: TeacherClassifier, cfg: CoSSLConfig) -> None:
    """One SGD step (Nesterov, momentum teacher_momentum, lr teacher_lr, weight decay on the weight only) of the
    teacher classifier on the gradient still in its `.grad`: USB's tfe_optimizer (get_optimizer's SGD over the
    teacher classifier), with PyTorch's own update. Its momentum starts at zero, which gives exactly what a first
    step's fresh buffer does. A non-finite gradient (an fp16 step the scaler skips) leaves both unchanged (USB
    would apply it)."""
    params = [head.bias, head.weight]
    grads = [param.grad for param in params]
    buffers = [head.momentum_bias, head.momentum_weight]
    finite = torch.stack([torch.isfinite(grad).all() for grad in grads]).all()
    before = [tensor.clone() for tensor in (*params, *buffers)]
    for param, grad, buffer, decay in zip(params, grads, buffers, (0.0, cfg.teacher_weight_decay), strict=True):
        sgd([param], [grad], [buffer], weight_decay=decay, momentum=cfg.teacher_momentum, lr=cfg.teacher_lr,
            dampening=0.0, nesterov=True, maximize=False)
    for tensor, old in zip((*params, *buffers), before, strict=True):
        tensor.copy_(torch.where(finite, tensor, old))
