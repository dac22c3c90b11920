"""Trainable Weight Averaging (TWA) merge: learn how to combine a few candidates instead of taking the mean.

The search starts at IMWA's uniform merge, learns the coefficients on the EMA teachers (the models that
are evaluated and carried forward), builds the students with the same coefficients so the pair stays
consistent, and keeps the learned merge only if it beats uniform on a second labeled split.
`imwa.merge=twa` chooses it; its options are `imwa.twa.*` (TWAConfig, registered with it).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ssl_imwa.data.transforms import normalize
from ssl_imwa.merge import (
    MergeContext,
    MergePlan,
    MergeResult,
    MergeStrategy,
    average_tensors,
    register_merge,
)
from ssl_imwa.metrics import classification_metrics
from ssl_imwa.validation import expect_choice, expect_positive

PARAMETERISATIONS = ("simplex", "affine")
GRANULARITIES = ("model", "layer")
DATA_SOURCES = ("twa-v", "twa-t")
BN_POLICIES = ("average", "recompute")

# Simplex logit of a non-replica candidate at the start (replicas sit at 0): its weight starts at
# e^-5/(K + ...) < 0.4% for K >= 2, so the start is uniform to within that, while Adam (which moves a
# logit by about `lr` per step) can still bring it to parity within ~100 steps at lr 0.05.
EXTRA_LOGIT = -5.0


@dataclass
class TWAConfig:
    parameterisation: str = "simplex"   # simplex: softmax(logits) weights; affine: mean + sum_k alpha_k (theta_k - mean)
    granularity: str = "model"          # model: one coefficient vector; layer: one per parameter tensor (name)
    include_start: bool = False         # the episode's start point as a candidate (affine: step beyond the average; simplex: a shorter step)
    include_teachers: bool = False      # each replica's EMA teacher as an extra candidate
    data: str = "twa-v"                 # twa-v: labeled class-stratified held-out (validation) split; twa-t: the labeled training images
    steps: int = 100                    # Adam steps
    lr: float = 0.05
    batch_size: int = 128
    bn: str = "average"                 # average: BN running stats averaged uniformly; recompute: re-estimated on unlabeled images
    bn_batches: int = 10
    accept: bool = True                 # accept the learned merge only if it beats uniform on the second split

    def validate(self) -> None:
        """Raise ValueError naming `imwa.twa.<key>` for a value out of range."""
        self.check_choices()
        for option in ("steps", "lr", "batch_size", "bn_batches"):
            expect_positive(f"imwa.twa.{option}", getattr(self, option))

    def check_choices(self) -> None:
        for option, allowed in (("parameterisation", PARAMETERISATIONS), ("granularity", GRANULARITIES),
                                ("data", DATA_SOURCES), ("bn", BN_POLICIES)):
            expect_choice(f"imwa.twa.{option}", getattr(self, option), allowed)


@dataclass
class Candidate:
    """One point TWA may combine: the teacher side is what the loss sees, the student side follows."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    label: str


@dataclass
class TWAResult:
    """The merged pair and everything needed to judge the merge from the logs."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    labels: list[str]                                  # candidate labels, in coefficient order
    num_replicas: int
    coefficients: list[float]                          # learned weight per candidate (layer: mean over tensors)
    coefficient_table: dict[str, list[float]] | None   # layer granularity: the weights of every parameter tensor
    accepted: bool                                     # False: student/teacher are the uniform merge
    uniform_accept_bacc: float | None                  # None: no accept split was given
    learned_accept_bacc: float | None
    fit_loss_start: float
    fit_loss_end: float
    labels_consumed: int
    seconds: float

    def applied_coefficients(self) -> list[float]:
        """The weights the returned state actually uses, comparable with the uniform strategy's report."""
        if self.accepted:
            return self.coefficients
        uniform = [1.0 / self.num_replicas] * self.num_replicas
        return uniform + [0.0] * (len(self.labels) - self.num_replicas)

    def report(self) -> dict[str, Any]:
        report = {
            "strategy": "twa", "labels": self.labels, "coefficients": self.applied_coefficients(),
            "learned_coefficients": self.coefficients, "accepted": self.accepted,
            "uniform_accept_bacc": self.uniform_accept_bacc, "learned_accept_bacc": self.learned_accept_bacc,
            "fit_loss_start": self.fit_loss_start, "fit_loss_end": self.fit_loss_end,
            "labels_consumed": self.labels_consumed, "seconds": self.seconds,
        }
        if self.coefficient_table is not None:
            report["coefficient_table"] = self.coefficient_table
        return report


def build_candidates(replica_states: list[dict[str, Any]], start_state: dict[str, Any] | None,
                     cfg: TWAConfig) -> list[Candidate]:
    """Replicas first (their uniform mean is where TWA starts), then the episode start, then the teachers.

    States are replica state dicts ({'model', 'teacher', ...}); the start is the merged state every
    replica began the episode from.
    """
    candidates = [Candidate(state["model"], state["teacher"], f"replica{k}") for k, state in enumerate(replica_states)]
    if cfg.include_start:
        if start_state is None:
            raise ValueError("twa.include_start=true needs the episode's start state")
        candidates.append(Candidate(start_state["model"], start_state["teacher"], "start"))
    if cfg.include_teachers:
        candidates += [Candidate(state["teacher"], state["teacher"], f"teacher{k}")
                       for k, state in enumerate(replica_states)]
    return candidates


def stratified_halves(targets: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Split a labeled set into two class-stratified halves (sorted index tensors), deterministic in `seed`.

    TWA-v fits on one half and checks on the other. Each class is cut as evenly as possible; classes
    with an odd count give their extra image to the halves in turn, so the halves differ by at most one.
    """
    targets = targets.cpu()
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    odd_classes = 0
    for cls in torch.unique(targets).tolist():
        members = torch.nonzero(targets == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        extra = len(members) % 2
        cut = len(members) // 2 + (extra if odd_classes % 2 == 0 else 0)
        odd_classes += extra
        first.append(members[:cut])
        second.append(members[cut:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def _check(cfg: TWAConfig, accept: tuple[Tensor, Tensor] | None, bn_images: Tensor | None) -> None:
    cfg.check_choices()
    if cfg.accept and accept is None:
        raise ValueError("twa.accept=true needs an accept split (a labeled validation half)")
    if cfg.bn == "recompute" and bn_images is None:
        raise ValueError("twa.bn='recompute' needs unlabeled images")


def _initial_coefficients(rows: int, num_candidates: int, num_replicas: int, cfg: TWAConfig) -> Tensor:
    """Raw coefficients whose weights are the uniform mean of the replicas (simplex: up to EXTRA_LOGIT)."""
    raw = torch.zeros(rows, num_candidates)
    if cfg.parameterisation == "simplex":
        raw[:, num_replicas:] = EXTRA_LOGIT
    return raw


def _weights(raw: Tensor, parameterisation: str, num_replicas: int) -> Tensor:
    """Per-candidate weights (one row per coefficient vector); every row sums to 1.

    Affine: mean + sum_c alpha_c (theta_c - mean), with the mean over the replicas, rewritten as the
    weights alpha_c + (1 - sum alpha) / K on the replicas and alpha_c on the extras.
    """
    if parameterisation == "simplex":
        return raw.softmax(dim=1)
    replica_mask = torch.zeros(raw.size(1), device=raw.device)
    replica_mask[:num_replicas] = 1.0 / num_replicas
    return raw + (1.0 - raw.sum(dim=1, keepdim=True)) * replica_mask


def _combine(table: Tensor, stacks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Row i of `table` weighs the candidates of the i-th parameter tensor."""
    return {name: torch.tensordot(row, stack, dims=1) for row, (name, stack) in zip(table, stacks.items())}


def _stacks(states: list[dict[str, Tensor]], names: list[str]) -> dict[str, Tensor]:
    return {name: torch.stack([state[name] for state in states]) for name in names}


def _index_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled epochs of full batches (a short tail is left for the next epoch's shuffle)."""
    size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            yield order[start:start + size]


@torch.no_grad()
def _predict(template: nn.Module, state: dict[str, Tensor], images: Tensor, head: str, batch_size: int,
             device: torch.device) -> Tensor:
    return torch.cat([functional_call(template, state, (images[start:start + batch_size].to(device),),
                                      strict=True)[head].float().cpu()
                      for start in range(0, len(images), batch_size)])


def _balanced_loss(logits: Tensor, targets: Tensor, class_weights: Tensor) -> Tensor:
    """Cross-entropy weighted by inverse class frequency of the fit data.

    F.cross_entropy divides by the total weight of the batch, so over the whole fit set this is the
    mean over classes of each class's mean loss: head classes cannot dominate the coefficients.
    """
    return F.cross_entropy(logits, targets.to(logits.device), weight=class_weights.to(logits.device))


def _balanced_accuracy(logits: Tensor, targets: Tensor) -> float:
    return classification_metrics(logits.argmax(dim=1), targets.cpu(), logits.size(1), {})["balanced_acc"]


@torch.no_grad()
def _recompute_bn(template: nn.Module, state: dict[str, Tensor], images: Tensor, batches: list[Tensor],
                  device: torch.device) -> dict[str, Tensor]:
    """Equal-weight (cumulative) BN running statistics of `state` over `batches`; everything else kept.

    Averaged statistics of different replicas need not match the merged weights; re-estimating them
    on unlabeled images uses no labels. Integer buffers stay those of replica 0.
    """
    model = copy.deepcopy(template).to(device)
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for index in batches:
        model(images[index].to(device))
    estimated = dict(model.named_buffers())
    return {name: estimated[name].detach().clone() if name in estimated and value.is_floating_point() else value
            for name, value in state.items()}


def twa_merge(candidates: list[Candidate], num_replicas: int, template: nn.Module, head: str,
              fit: tuple[Tensor, Tensor], accept: tuple[Tensor, Tensor] | None, cfg: TWAConfig,
              bn_images: Tensor | None, generator: torch.Generator) -> TWAResult:
    """Learn combination weights of `candidates` (the first `num_replicas` are the replicas) on `fit`.

    `fit` and `accept` are (normalised float images, targets); `accept` may be None only with
    cfg.accept=False. `template` supplies the architecture (its own tensors are never used) and
    `head` the logits the loss and the accuracies read. Mini-batches come from `generator`.
    """
    started = time.perf_counter()
    _check(cfg, accept, bn_images)
    was_training = template.training
    template.eval()
    names = [name for name, _ in template.named_parameters()]
    uniform_teacher = average_tensors([candidate.teacher for candidate in candidates[:num_replicas]])
    uniform_student = average_tensors([candidate.student for candidate in candidates[:num_replicas]])
    fitted = _fit(candidates, num_replicas, template, head, fit, cfg, generator, names, uniform_teacher)
    device = fitted.table.device
    teacher = fitted.teacher
    student = {**uniform_student,
               **_combine(fitted.table, _stacks([candidate.student for candidate in candidates], names))}
    if cfg.bn == "recompute":
        bn_index = _index_batches(len(bn_images), cfg.batch_size, generator)
        bn_batches = [next(bn_index) for _ in range(cfg.bn_batches)]
        teacher = _recompute_bn(template, teacher, bn_images, bn_batches, device)
        student = _recompute_bn(template, student, bn_images, bn_batches, device)
    uniform_bacc = learned_bacc = None
    accepted = True
    if accept is not None:
        uniform_bacc, learned_bacc = (
            _balanced_accuracy(_predict(template, state, accept[0], head, cfg.batch_size, device), accept[1])
            for state in (uniform_teacher, teacher))
        accepted = learned_bacc > uniform_bacc or not cfg.accept
    if not accepted:
        teacher, student = uniform_teacher, uniform_student
    template.train(was_training)
    # twa-t fits on the training labels (already spent by training); every other label is held out.
    labels_consumed = (len(fit[1]) if cfg.data == "twa-v" else 0) + (len(accept[1]) if accept is not None else 0)
    return TWAResult(
        student=student, teacher=teacher, labels=[candidate.label for candidate in candidates],
        num_replicas=num_replicas, coefficients=fitted.table.mean(dim=0).tolist(),
        coefficient_table=({name: row.tolist() for name, row in zip(names, fitted.table)}
                           if cfg.granularity == "layer" else None),
        accepted=accepted, uniform_accept_bacc=uniform_bacc, learned_accept_bacc=learned_bacc,
        fit_loss_start=fitted.loss_start, fit_loss_end=fitted.loss_end, labels_consumed=labels_consumed,
        seconds=time.perf_counter() - started,
    )


@dataclass
class _Fitted:
    """The learned coefficient table (one row per parameter), the teacher it merges, and the
    class-balanced fit loss before and after learning."""

    table: Tensor
    teacher: dict[str, Tensor]
    loss_start: float
    loss_end: float


def _fit(candidates: list[Candidate], num_replicas: int, template: nn.Module, head: str,
         fit: tuple[Tensor, Tensor], cfg: TWAConfig, generator: torch.Generator, names: list[str],
         uniform_teacher: dict[str, Tensor]) -> _Fitted:
    """Adam on the coefficients of the teachers' parameters, `cfg.steps` mini-batches of `fit`, minimising
    the class-balanced cross-entropy of the merged teacher (buffers stay the uniform average)."""
    teacher_stacks = _stacks([candidate.teacher for candidate in candidates], names)
    device = teacher_stacks[names[0]].device
    fit_images, fit_targets = fit[0], fit[1].cpu()
    rows = len(names) if cfg.granularity == "layer" else 1
    raw = _initial_coefficients(rows, len(candidates), num_replicas, cfg).to(device).requires_grad_()

    def merged_teacher(table: Tensor) -> dict[str, Tensor]:
        return {**uniform_teacher, **_combine(table.expand(len(names), -1), teacher_stacks)}

    start_logits = _predict(template, merged_teacher(_weights(raw.detach(), cfg.parameterisation, num_replicas)),
                            fit_images, head, cfg.batch_size, device)
    counts = torch.bincount(fit_targets, minlength=start_logits.size(1)).float()
    class_weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts)).to(device)
    loss_start = _balanced_loss(start_logits, fit_targets, class_weights).item()
    optimizer = torch.optim.Adam([raw], lr=cfg.lr)
    batches = _index_batches(len(fit_images), cfg.batch_size, generator)
    for _ in range(cfg.steps):
        index = next(batches)
        state = merged_teacher(_weights(raw, cfg.parameterisation, num_replicas))
        logits = functional_call(template, state, (fit_images[index].to(device),), strict=True)[head]
        loss = _balanced_loss(logits.float(), fit_targets[index].to(device), class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    table = _weights(raw.detach(), cfg.parameterisation, num_replicas).expand(len(names), -1)
    teacher = merged_teacher(table)
    end_logits = _predict(template, teacher, fit_images, head, cfg.batch_size, device)
    return _Fitted(table, teacher, loss_start, _balanced_loss(end_logits, fit_targets, class_weights).item())


@register_merge("twa", config=TWAConfig)
class TWAMerge(MergeStrategy):
    """`imwa.merge=twa`: coefficients learned on a labeled split (imwa.twa.*), then accepted or not.

    The fit and acceptance splits, and the unlabeled images for BN re-estimation, are prepared once
    per run from the context's data. The students' and teachers' states go to process 0 only, which
    learns the merge and broadcasts it.
    """

    uses_data = True

    @classmethod
    def check(cls, options: TWAConfig, plan: MergePlan) -> None:
        if plan.held_out_per_class == 0 and (options.data == "twa-v" or options.accept):
            raise ValueError("imwa.merge=twa with imwa.twa.data=twa-v or imwa.twa.accept=true needs a labeled "
                             "held-out split: set dataset.val_per_class > 0 (those labels are reported as consumed)")

    def __init__(self, context: MergeContext) -> None:
        super().__init__(context)
        assert context.data is not None  # uses_data: the engine gives the run's images
        data, device, seed = context.data.data, context.data.device, context.seed
        self.options: TWAConfig = context.options
        prepare = lambda images: normalize(images, data.mean, data.std).to(device)
        self.fit: tuple[Tensor, Tensor] | None = None
        self.accept: tuple[Tensor, Tensor] | None = None
        if data.val_images is not None:
            val = (prepare(data.val_images), data.val_targets.to(device))
            if self.options.data == "twa-v":  # fit on one class-stratified half, accept on the other
                first, second = stratified_halves(data.val_targets, seed)
                self.fit, self.accept = (val[0][first], val[1][first]), (val[0][second], val[1][second])
            else:
                self.accept = val
        if self.options.data == "twa-t":  # the training objective's labeled images: no extra labels to fit
            self.fit = (prepare(data.labeled_images), data.labeled_targets.to(device))
        self.bn_images: Tensor | None = None
        if self.options.bn == "recompute":
            count = min(len(data.unlabeled_images), self.options.bn_batches * self.options.batch_size)
            order = torch.randperm(len(data.unlabeled_images), generator=torch.Generator().manual_seed(seed))
            self.bn_images = prepare(data.unlabeled_images[order[:count]])

    @property
    def needs_episode_start(self) -> bool:
        return self.options.include_start

    def __call__(self, states: list[dict[str, Any]], indices: list[int], start: dict[str, Any], episode: int
                 ) -> MergeResult:
        context, learn = self.context, self.context.data
        shipped = [(index, {"model": state["model"], "teacher": state["teacher"]})
                   for index, state in zip(indices, states)]
        gathered = context.comm.gather_object(shipped, "TWA candidate gather")
        result = None
        if gathered is not None:  # process 0
            ordered = [state for _, state in sorted((item for chunk in gathered for item in chunk),
                                                    key=lambda item: item[0])]
            generator = torch.Generator().manual_seed(context.seed * 100_003 + episode)
            merged = twa_merge(build_candidates(ordered, start, self.options), context.replicas, learn.template,
                               learn.eval_head, self.fit, self.accept, self.options, self.bn_images, generator)
            result = (merged.student, merged.teacher, merged.report())
        student, teacher, report = context.comm.broadcast_object(result, "TWA result broadcast")
        return MergeResult(model=student, teacher=teacher, report={**report, "strategy": "twa"})
