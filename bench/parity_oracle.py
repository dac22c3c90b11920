"""Shared-randomness per-step oracle: our training step against USB's (semilearn 0.3.2), tensor by tensor.

bench/parity_usb.py compares whole runs whose initial weights, batches and augmentations come from
different random streams, so a paired difference mixes implementation and stream. Here both sides
start from ONE state_dict (ours, built and seeded as `python main.py` builds it) and every step
both get the SAME batch (the exact tensors our TrainStream hands our trainer). Our side is
`Trainer.step` on a replica built by ssl_imwa.run (our config composed by Hydra with
parity_usb.our_overrides); USB's is `train_step` with its update and EMA hooks (parity_usb.usb_step).
After each step the student's parameters and BN buffers and the teacher's parameters and buffers
are compared; the first step where a tensor differs by more than --tol (max |a - b| / max |a|) is
reported, with the unlabeled mask rates of both sides (a flipped threshold decision is where
rounding noise turns into a different trajectory).

DASO differs from ours by design (docs/results/parity_usb.md items 8-11); --align switches USB's
DASO to our choice one item at a time, so the oracle can show which item a divergence comes from:

    samebatch   item 9: blend the current batch's semantic similarities (parity_usb's daso_samebatch)
    mask        item 8: threshold the blended pseudo-label instead of the linear one
    boundary    item 10: alignment loss from the first blending step (20), not one step earlier
    bn_once     item 11: undo the queue forward's update of the student's BN running statistics
    eval_queue  item 11: queue features from the EMA model in eval mode (implies bn_once)
    f32_weights SAW: USB's initial unlabeled class weights in float32 (USB: float64 until its first re-estimate)
    prior_sign  TRAS: USB's adjustment from the labeled frequencies (log pi_l, official) instead of min(n) / n_c
    teacher_target  TRAS: transfer the standard head's strong-view logits, not the target head's weak-view ones
    warmup_zero TRAS: during the warm-up the target head's losses with weight 0 (our zero gradient), not left out
    joint_head  TRAS: the target head's logits from the joint forward's whole batch, not its linear layer per slice
    joint_head  ABC: the same for ABC's auxiliary classifier (USB applies it to x_lb, x_ulb_w and x_ulb_s apart)
    tfe_class   CoSSL: USB's co-learning labels one-hot (as the official code's), so its `mixup_prob[label.argmax()]`
                reads the row's class, not class 0 (whose probability 0 never mixes)
    eval_teacher  CoSSL: USB's EMA model computes the co-learning features in eval mode (its BN on running statistics)
    rng         CoSSL: USB's random numbers are ours (co-learning: random.random and np.random.uniform per row;
                classifier warm-up: np.random.choice and np.random.beta per class, the classifier's
                reset_parameters, the feature loader's shuffles)
    ema_lerp    any algorithm: USB's EMA update with our formula (torch.lerp; USB (1 - m) p + m shadow rounds
                differently, 1e-7 to 1e-5 of the teachers): for CoSSL, whose classifier learns from the teacher's
                features, this shows the rest bitwise

DebiasPL and SAW run on both sides' own code as shipped. `--ours KEY=VALUE` adds overrides to OUR side
only: `--ours algorithm.usb_order=true` switches our DebiasPL to USB's order of estimate, pseudo-labels
and margin. `--saw-epoch N` ends a SAW epoch every N steps on both sides (ours: algorithm.epoch_length=N;
USB: its after_train_epoch pass over the unlabeled images, then before_train_epoch), so a short run
crosses the re-weighting; without it both keep the recipe's 1,024-step epoch. The estimate each keeps
(DebiasPL's p_hat, SAW's unlabeled weights) is compared after every step as well.
ADSH: both sides end an epoch every parity_usb.ADSH_EPOCH = 50 steps (ours: algorithm.epoch_length; USB: its
hook's after_train_epoch on its `evaluate('eval_ulb')` over our unlabeled images, in our pass's batches and
order, unaugmented); the class scores s of both sides are compared after every step ("state").
ABC: USB's side is its ABCNet (auxiliary classifier compared as our ABC head) in the DataParallel wrapper
its train.py adds; each step USB's epoch is set as its loop sets it (the recipe's 256 epochs) and the
global generator is reset to where our step found it, so `--ours algorithm.usb_rng=true` (torch.bernoulli on
that generator, as USB) makes both sides draw the same Bernoulli masks; our default draws differ by design.

DARP: both sides get the batch's unlabeled indices (USB's `idx_ulb`, which USB's loader yields for every
algorithm and its `process_batch` passes to those that ask), 10-step epochs with refinement from step 50
and the solver every 10 steps (parity_usb.DARP_*); USB's epoch is set as its loop sets it. The refined
pseudo-labels of every unlabeled image are compared after every step ("state").

CReST+: parity_usb.CREST_GENERATIONS = 2 generations, --steps split between them. At the boundary both sides
label our unlabeled images with their EMA teacher (USB: its `evaluate('eval_ulb')` unaugmented, as ADSH) and
pick (USB: CReST.train's per-class confidence order, then its own get_split); the labeled sets they build
must be identical (images and classes, in order), else the oracle stops there. Then both restart from OUR
next generation's initial weights (USB: a new optimizer and its before_run hooks, as its re_init and
train() loop do), our stream over the new labeled set feeding both, each alignment estimate p_model going
on from the first generation (compared as "state").

CoSSL: both sides run plain FixMatch for parity_usb.COSSL_EPOCH = 50 steps, then the classifier warm-up (USB: its
before_train_epoch of epoch 1, its loaders reading our images as our dataset pass does, parity_usb.patch_usb_cossl;
10 epochs of COSSL_CLASSIFIER_STEPS Adam steps), then co-learning, USB's co-learning loaders handing it our step's
class-balanced labeled batch and the unlabeled strong views we pair with it. USB's CoSSL_Net sits in the
DataParallel wrapper its train.py adds; its teacher_classifier is compared as our teacher head, its tfe_optimizer's
momentum as that head's momentum buffers. The three CoSSL --align items take USB to our design.

TRAS: the target head joins after parity_usb.TRAS_WARMUP = 20 steps on both sides (USB's epoch set as its loop
sets it); USB's TRASNet sits in the DataParallel wrapper its train.py adds, its aux_classifier compared as our
target head. The four TRAS --align items above take USB to our design; with all four the runs are bitwise.

Run (one process, one thread; USB set up as in bench/parity_usb.py):

    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo fixmatch --steps 200
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo daso --steps 200 --align all
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo debiaspl --steps 200 --ours algorithm.usb_order=true
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo saw --steps 200 --saw-epoch 50
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo adsh --steps 200
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo abc --steps 200 --ours algorithm.usb_rng=true
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo abc --steps 200 --ours algorithm.usb_rng=true --align joint_head
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo darp --steps 200 --ours algorithm.threshold_refined=false
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo tras --steps 200 --align prior_sign teacher_target warmup_zero joint_head
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo crest --steps 200
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo cossl --steps 200 --align tfe_class eval_teacher rng
    /tmp/usb_venv/bin/python bench/parity_oracle.py --algo fixmatch --steps 1000 --seeds 0 1 2 --score
    /tmp/usb_venv/bin/python bench/parity_oracle.py report   # markdown table of the scored runs
"""

from __future__ import annotations

import argparse
import json
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.parity_usb import (
    BATCH,
    CREST_GENERATIONS,
    LR,
    WD,
    build_usb,
    our_overrides,
    score,
    usb_step,
)

ALIGN_ITEMS = ("samebatch", "mask", "boundary", "bn_once", "eval_queue", "f32_weights", "prior_sign", "teacher_target",
               "warmup_zero", "joint_head", "tfe_class", "eval_teacher", "rng", "ema_lerp")
COSSL_HEADS = ("logits_tfe", "logits_cossl")   # ssl_imwa.algorithms.cossl: TEACHER_HEAD, EVAL_HEAD
ABC_HEAD = "logits_abc"   # ssl_imwa.algorithms.abc.ABC_HEAD: our name of ABC's auxiliary head
TRAS_HEAD = "logits_aux"   # ssl_imwa.algorithms.tras.TARGET_HEAD: our name of TRASNet's aux_classifier
REPORT_STEPS = (1, 2, 5, 10, 20, 21, 50, 100, 200, 500, 1000)


class Tee:
    """Our training stream, keeping the batch it last handed out so USB can get the same tensors."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last: dict[str, Any] = {}

    def __iter__(self) -> Tee:
        return self

    def __next__(self) -> dict[str, Any]:
        self.last = next(self.stream)
        return self.last

    def __getattr__(self, name: str) -> Any:
        """The rest is the stream's (`unlabeled_batches`, which the trainer's pass over the unlabeled set reads)."""
        return getattr(self.stream, name)


def build_ours(algo: str, seed: int, run_dir: Path, engine: Path, extra: list[str]) -> tuple[Any, Any, Any, Any]:
    """(trainer, replica, data, config) exactly as ssl_imwa.run builds them for parity_usb's command line.

    `engine`: the checkout whose ssl_imwa/ and configs/ are tested (a snapshot such as
    `git archive HEAD ssl_imwa configs` keeps a long run clear of edits in progress); `extra`: overrides
    appended to parity_usb's.
    """
    sys.path.insert(0, str(engine))
    from hydra import compose, initialize_config_dir

    from ssl_imwa.builders import (
        build_algorithm,
        build_initial_model,
        build_replica,
        configure_torch,
    )
    from ssl_imwa.config import register_configs, validate
    from ssl_imwa.data import build_data
    from ssl_imwa.rng import seed_everything
    from ssl_imwa.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=str(engine / "configs"), version_base="1.3"):
        raw = compose("config", overrides=[*our_overrides(algo, seed, 1), *extra, f"run_dir={run_dir}"])
    cfg = validate(raw)
    device = configure_torch(cfg)
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset)
    algorithm = build_algorithm(cfg, data, device)
    initial = build_initial_model(cfg, data, algorithm, device)
    replica = build_replica(0, cfg, data, algorithm, initial, device)
    replica.stream = Tee(replica.stream)
    return Trainer(cfg.train, device), replica, data, cfg


def next_generation_ours(trainer: Any, replica: Any, data: Any, cfg: Any, generation: int) -> tuple[Any, Any]:
    """Our next generation as ssl_imwa.imwa starts it (K = 1: the teacher is the merged model): the teacher's
    pass, the algorithm's picks, fresh replica parts on the labeled set with them, the estimate inherited.
    Returns (replica, its data)."""
    from ssl_imwa.builders import (
        build_algorithm,
        build_initial_model,
        build_replica,
        generation_rng,
    )

    outputs = trainer.predict_unlabeled(replica.teacher.module, replica.stream)
    picked = data.with_pseudo_labels(*replica.algorithm.pseudo_labels_for_next_generation(outputs))
    device = trainer.device
    with generation_rng(cfg.seed, generation, device):
        algorithm = build_algorithm(cfg, picked, device, generation, data.counts["labeled"])
        initial = build_initial_model(cfg, picked, algorithm, device)
    algorithm.inherit(replica.algorithm)
    fresh = build_replica(0, cfg, picked, algorithm, initial, device, generation=generation)
    fresh.stream = Tee(fresh.stream)
    return fresh, picked


def next_generation_usb(usb: Any, data: Any, initial: dict[str, torch.Tensor], generation: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """USB's CReST between generations: its pass and pick (CReST.train's lines, then its get_split, which
    returns the next labeled set), and its re_init from OUR next initial weights: a new optimizer (no
    scheduler: ImbAlgorithmBase), the temperature of CReST.train, the before_run hooks (a new EMA)."""
    import math

    from semilearn.core.utils import get_optimizer

    np.math = math   # USB 0.3.2's get_split calls np.math.pow, an alias of Python's math that NumPy 2 removed
    logits = torch.as_tensor(usb.evaluate("eval_ulb", return_logits=True)["eval_ulb/logits"])
    score_, predicted = torch.max(torch.softmax(logits, dim=1), dim=1)
    pseudo_label_list = []
    for cls in range(usb.num_classes):
        members = torch.where(predicted == cls)[0]
        pseudo_label_list.append(members[torch.argsort(score_[members], descending=True)].numpy())
    labeled = usb.get_split(data.labeled_images.numpy(), data.labeled_targets.numpy(), data.unlabeled_images.numpy(),
                            data.unlabeled_targets.numpy(), pseudo_label_list)
    usb_net(usb.model).load_state_dict(initial)
    usb_net(usb.ema_model).load_state_dict(initial)
    usb.optimizer = get_optimizer(usb.model, "SGD", LR, 0.9, WD, 1.0, bn_wd_skip=False)
    usb.scheduler = None
    usb.gen = generation
    progress = generation / (usb.num_gens - 1)
    usb.cur_dist_align_t = (1.0 - progress) * 1.0 + progress * usb.dist_align_t
    usb.call_hook("before_run")
    return labeled


def align_usb_daso(algorithm: Any, items: set[str]) -> None:
    """Switch USB's DASO (after `before_run`) to our design for each named item (module docstring)."""
    state: dict[str, Any] = {}
    student_buffers = list(algorithm.model.buffers())
    apply_shadow, enqueue, train_step = algorithm.ema.apply_shadow, algorithm.queue.enqueue, algorithm.train_step

    def shadow_saving_bn() -> None:
        state["bn"] = [b.clone() for b in student_buffers]
        apply_shadow()

    def enqueue_aligned(features: torch.Tensor, labels: torch.Tensor) -> None:
        for buffer, saved in zip(student_buffers, state["bn"], strict=True):
            buffer.copy_(saved)
        if "eval_queue" in items:
            teacher = algorithm.ema_model.eval()
            features = teacher(state["x_lb"])["feat"]
            teacher.train()
        enqueue(features, labels)

    def step_aligned(**kwargs: Any) -> Any:
        state["x_lb"] = kwargs["x_lb"]
        warmup = algorithm.num_pretrain_iter
        if "boundary" in items and algorithm.it == warmup - 1:
            algorithm.num_pretrain_iter = warmup + 1  # DASO.train_step returns before the alignment loss
        try:
            return train_step(**kwargs)
        finally:
            algorithm.num_pretrain_iter = warmup

    if items & {"bn_once", "eval_queue"}:
        algorithm.ema.apply_shadow = shadow_saving_bn
        algorithm.queue.enqueue = enqueue_aligned
    if items & {"boundary", "eval_queue"}:
        algorithm.train_step = step_aligned
    if "mask" in items:
        hook = algorithm.hooks_dict["MaskingHook"]
        linear_mask = hook.masking
        labeler = algorithm.hooks_dict["PseudoLabelingHook"]

        def blended_mask(alg: Any, logits_x_ulb: torch.Tensor, softmax_x_ulb: bool = True, **kwargs: Any
                         ) -> torch.Tensor:
            if alg.it < alg.num_pretrain_iter:
                return linear_mask(alg, logits_x_ulb, softmax_x_ulb, **kwargs)
            probs = logits_x_ulb.detach()  # FixMatch passes probabilities (softmax_x_ulb=False)
            dist = labeler.get_pl_dist().to(probs.device) ** (1.0 / alg.T_dist)
            weight = (dist / dist.max())[probs.argmax(dim=1)].view(-1, 1)
            blended = (1.0 - weight) * probs + weight * alg.probs_sim
            return blended.max(dim=1)[0].ge(alg.p_cutoff).to(probs.dtype)

        hook.masking = blended_mask


def algorithm_states(algo: str, ours: Any, usb: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The estimate both sides keep, (ours, USB's): DebiasPL's p_hat, SAW's unlabeled class weights."""
    if algo == "debiaspl":
        return ours.p_hat, usb.p_hat
    if algo == "saw":
        return ours.unlabeled_weights, usb.x_ulb_weights
    if algo == "adsh":   # the class scores s (thresholds exp(-s))
        return ours.s, usb.hooks_dict["MaskingHook"].adsh_s
    if algo == "darp":   # the refined pseudo-labels of every unlabeled image
        return ours.refined, usb.hooks_dict["PseudoLabelingHook"].pseudo_refine
    if algo == "crest":   # the alignment's estimate of the model's class distribution
        return ours.p_model, usb.hooks_dict["DistAlignHook"].p_model
    return None


def state_difference(algo: str, ours: Any, usb: Any) -> dict[str, float]:
    """{'state': max|a - b| / max|a|} for the algorithm's estimate, {} for algorithms without one."""
    pair = algorithm_states(algo, ours, usb)
    if pair is None:
        return {}
    a, b = (t.double() for t in pair)
    return {"state": ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()}


def usb_net(model: nn.Module) -> nn.Module:
    """USB's network under our tensor names: its `net` (our classifier); for ABC (USB's ABCNet inside the
    DataParallel wrapper of its train.py) that classifier with ABCNet's auxiliary classifier as our ABC head."""
    if not isinstance(model, nn.DataParallel):
        return model.net
    abc = model.module
    view = nn.Module()   # shares USB's modules: loading into it loads USB's tensors
    view.backbone = abc.backbone.net.backbone
    head = TRAS_HEAD if type(abc).__name__ == "TRASNet" else ABC_HEAD   # TRASNet has ABCNet's layout
    view.heads = nn.ModuleDict({**abc.backbone.net.heads, head: abc.aux_classifier})
    return view


def before_usb_step(usb: Any, algo: str, step: int, rng: torch.Tensor) -> None:
    """ABC: USB's epoch as its train() loop sets it (its Bernoulli schedule reads epoch / epochs), and the
    global generator as our step found it, so that with --ours algorithm.usb_rng=true both draw the same."""
    if algo == "abc":
        usb.epoch = step // usb.num_iter_per_epoch
        torch.set_rng_state(rng)
    if algo == "tras":   # USB's TRAS trains its aux head once epoch >= tras_warmup_epochs
        usb.epoch = step // usb.num_iter_per_epoch
    if algo == "darp":   # USB's DARP refines once epoch > darp_warmup_epochs
        usb.epoch = step // usb.num_iter_per_epoch
    if algo == "cossl":   # USB's loop: before_train_epoch at each epoch's start (CoSSL's classifier warm-up at one)
        usb.epoch = step // usb.num_iter_per_epoch
        if step % usb.num_iter_per_epoch == 0:
            usb.call_hook("before_train_epoch")


def end_usb_epoch(usb: Any, algo: str, step: int, saw_epoch: int) -> None:
    """USB's epoch hooks where its train() loop calls them: SAW re-weights, ADSH re-estimates its scores
    (from its `evaluate('eval_ulb')`, parity_usb.patch_usb_adsh) after an epoch's last step."""
    from bench.parity_usb import ADSH_EPOCH

    epoch = {"saw": saw_epoch, "adsh": ADSH_EPOCH}.get(algo, 0)
    if epoch and (step + 1) % epoch == 0:
        usb.call_hook("after_train_epoch")
        usb.call_hook("before_train_epoch")


def usb_tensor_groups(usb: Any, algo: str) -> dict[str, dict[str, torch.Tensor]]:
    """USB's tensors under our names (usb_net; CoSSL: cossl_view)."""
    return tensor_groups(usb_view(usb, algo, usb.model), usb_view(usb, algo, usb.ema_model))


def usb_view(usb: Any, algo: str, model: nn.Module) -> nn.Module:
    """One of USB's nets under our tensor names."""
    return cossl_view(usb, model) if algo == "cossl" else usb_net(model)


def cossl_view(usb: Any, model: nn.Module) -> nn.Module:
    """USB's CoSSL_Net (in its DataParallel wrapper) under our names: its standard classifier as our head, its
    teacher_classifier as our teacher head with the student's tfe_optimizer momentum (zero before its first step)
    as that head's buffers (ours keeps them in the head, and the EMA teacher copies them), and whether its
    classifier warm-up has run as our evaluated head's switch."""
    net, student = model.module, usb.model.module.teacher_classifier
    view = nn.Module()   # shares USB's modules: loading into it loads USB's tensors
    view.backbone = net.backbone.net.backbone
    teacher, switch = nn.Module(), nn.Module()
    teacher.weight, teacher.bias = net.teacher_classifier.weight, net.teacher_classifier.bias
    for name, param in (("momentum_weight", student.weight), ("momentum_bias", student.bias)):
        state = usb.tfe_optimizer.state.get(param, {})
        teacher.register_buffer(name, state.get("momentum_buffer", torch.zeros_like(param)))
    switch.register_buffer("switched", torch.tensor(int(getattr(usb, "cossl_switched", False))))
    view.heads = nn.ModuleDict({"logits": net.classifier, COSSL_HEADS[0]: teacher, COSSL_HEADS[1]: switch})
    return view


class NumpyWith:
    """NumPy, with the np.random functions given replaced (what USB's CoSSL modules call as np.random.*)."""

    def __init__(self, **random_functions: Any) -> None:
        self.random = type("Random", (), {name: staticmethod(f) for name, f in random_functions.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def align_usb_cossl(usb: Any, items: set[str], ours: Any) -> None:
    """Switch USB's CoSSL to our design for each CoSSL --align item (module docstring): `rng` replaces its
    random sources by our draws (feed_usb_cossl for the co-learning ones, here the classifier warm-up's, from
    cossl.warmup_draws at the warm-up's step); `tfe_class` is in feed_usb_cossl, `eval_teacher` in start_usb.
    Whatever is aligned, marks when USB's classifier warm-up runs (our evaluated head's switch)."""
    import semilearn.imb_algorithms.cossl.cossl as cossl_module
    import semilearn.imb_algorithms.cossl.utils as cossl_utils

    from bench import parity_usb
    from ssl_imwa.algorithms.cossl import warmup_draws

    hook = usb.hooks_dict["ParamUpdateHook"]
    warm_up = hook.before_train_epoch
    state: dict[str, Any] = {"row": -1}

    def aligned_warm_up(algorithm: Any) -> None:
        if algorithm.epoch != algorithm.warm_epoch:
            return warm_up(algorithm)
        algorithm.cossl_switched = True
        if "rng" not in items:
            return warm_up(algorithm)
        step = algorithm.epoch * algorithm.num_iter_per_epoch
        draws = warmup_draws(ours.key, step, ours.context.labeled_counts, algorithm.model.module.num_features, ours.cfg)
        rows, lambdas = list(draws.partner_rows.values()), list(draws.lambdas.values())
        parity_usb.COSSL_ORDERS[:] = draws.permutations
        cossl_utils.np = NumpyWith(choice=lambda *args, **kwargs: rows.pop(0),
                                   beta=lambda *args, **kwargs: lambdas.pop(0))
        reset = nn.Linear.reset_parameters

        def our_initialisation(layer: nn.Linear) -> None:
            if layer.bias is None:   # the imprinted classifier, whose weights USB overwrites
                return reset(layer)
            with torch.no_grad():
                layer.weight.copy_(draws.weight)
                layer.bias.copy_(draws.bias)

        nn.Linear.reset_parameters = our_initialisation
        try:
            return warm_up(algorithm)
        finally:
            nn.Linear.reset_parameters = reset
            cossl_utils.np = np
            assert not rows and not lambdas and not parity_usb.COSSL_ORDERS, "USB used other draws than ours"

    hook.before_train_epoch = aligned_warm_up
    if "rng" in items:   # the co-learning draws: row i's uniform, then (when it mixes) its lambda
        def uniform() -> float:
            state["row"] += 1
            return state["uniforms"][state["row"]]

        cossl_module.random = type("Random", (), {"random": staticmethod(uniform)})
        cossl_module.np = NumpyWith(uniform=lambda low, high, size: np.array([state["lambdas"][state["row"]]]))
    usb.cossl_rng_state = state


def feed_usb_cossl(usb: Any, batch: dict[str, Any], ours: Any, step: int, items: set[str]) -> None:
    """The co-learning batches USB's loaders hand it at `step` (parity_usb.StepFeed): our class-balanced labeled
    batch (one-hot labels with `tfe_class`) and the unlabeled strong views we pair with it (row mu * r with row r);
    with `rng`, our draws of the step for its random.random and np.random.uniform."""
    labels, stride = batch["y_balanced"], len(batch["u_strong"][0]) // len(batch["x"])
    rows = len(labels)
    targets = torch.nn.functional.one_hot(labels, usb.num_classes).float() if "tfe_class" in items else labels.clone()
    usb.cossl_feed = {"labeled": {"x_lb": batch["x_balanced"].clone(), "y_lb": targets},
                      "unlabeled": {"x_ulb_s": batch["u_strong"][0][::stride][:rows].clone()}}
    if "rng" in items:
        uniforms, lambdas = ours.mixing_draws(step, rows)
        usb.cossl_rng_state.update(row=-1, uniforms=uniforms.tolist(), lambdas=lambdas.tolist())


def tensor_groups(student: nn.Module, teacher: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Named tensors of one side in four groups: student/teacher parameters and buffers."""
    return {"student param": dict(student.named_parameters()), "student buffer": dict(student.named_buffers()),
            "teacher param": dict(teacher.named_parameters()), "teacher buffer": dict(teacher.named_buffers())}


def differences(ours: dict[str, dict[str, torch.Tensor]], usb: dict[str, dict[str, torch.Tensor]]
                ) -> dict[str, tuple[float, str]]:
    """Per group: the largest relative difference max|a - b| / max|a| over its tensors, and that tensor's name."""
    worst: dict[str, tuple[float, str]] = {}
    for group, tensors in ours.items():
        rel = {name: ((a.double() - usb[group][name].double()).abs().max()
                      / a.double().abs().max().clamp(min=1e-12)).item() for name, a in tensors.items()}
        name = max(rel, key=lambda n: rel[n])
        worst[group] = (rel[name], name)
    return worst


def bn_recalibrated(model: nn.Module, data: Any) -> nn.Module:
    """A copy whose BN running statistics are re-estimated under ITS OWN weights on the unaugmented training
    images (labeled and unlabeled, cumulative average): separates a teacher's weights from its statistics."""
    from ssl_imwa.data.transforms import normalize

    copy = deepcopy(model).train()
    for module in copy.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    images = normalize(torch.cat([data.labeled_images, data.unlabeled_images]), data.mean, data.std)
    with torch.no_grad():
        for chunk in images.split(BATCH * 4):
            copy(chunk)
    return copy.eval()


def start_usb(algo: str, seed: int, items: set[str], out: Path, data: Any, initial: dict[str, torch.Tensor],
              perturb: float) -> Any:
    """USB's side from OUR initial weights, after its `before_run`, with the --align items switched."""
    usb_algo = "daso_samebatch" if algo == "daso" and "samebatch" in items else algo
    usb = build_usb(usb_algo, seed, out, data)
    if "ema_lerp" in items:
        usb_ema_as_ours()
    if perturb:  # rounding-sized noise on USB's copy: how fast identical code amplifies it
        noise = torch.Generator().manual_seed(seed)
        initial = {name: t * (1 + perturb * torch.randn(t.shape, generator=noise)) if t.is_floating_point() else t
                   for name, t in initial.items()}
    usb_view(usb, algo, usb.model).load_state_dict(initial)
    usb_view(usb, algo, usb.ema_model).load_state_dict(initial)
    usb.call_hook("before_run")  # USB's EMA registers the (now shared) initial weights here
    if algo == "daso":
        align_usb_daso(usb, items)
    if algo == "saw":
        if "f32_weights" in items:
            usb.x_ulb_weights = usb.x_ulb_weights.float()
        usb.call_hook("before_train_epoch")   # hands the class weights to USB's losses
    if algo == "tras":
        align_usb_tras(usb, items)
    if algo == "abc" and "joint_head" in items:
        align_usb_joint_head(usb)
    if algo == "crest":   # CReST.train sets both before each generation
        usb.gen, usb.cur_dist_align_t = 0, 1.0
    if algo == "cossl":
        usb.cossl_switched = False   # whether USB's classifier warm-up has run (compared as our evaluated head's switch)
        if "eval_teacher" in items:
            usb.ema_model.eval()
    return usb


def usb_ema_as_ours() -> None:
    """--align ema_lerp: USB's EMA.update (semilearn/core/utils/misc.py:152-155) with our update's formula,
    shadow <- lerp(shadow, p, 1 - m), as ssl_imwa/ema.py's torch._foreach_lerp_."""
    from semilearn.core.utils.misc import EMA

    def update(self: Any) -> None:
        for name, param in self.model.named_parameters():
            self.shadow[name] = torch.lerp(self.shadow[name], param.data, 1.0 - self.decay)

    EMA.update = update


def align_usb_joint_head(usb: Any) -> None:
    """--align joint_head for ABC and TRAS: their nets (ABCNet, TRASNet) compute the auxiliary classifier on
    the whole batch's features, as our model computes every head, and their train_step applies the layer
    again to each slice of them; here those calls return the slices of the forward's output, so the layer's
    gradient is one sum over all rows, as ours (the layer's own forward still serves the net's)."""
    state: dict[str, torch.Tensor] = {}
    usb.model.module.register_forward_hook(
        lambda module, args, output: state.update(features=output["feat"], aux=output["logits_aux"]))
    layer = usb.model.module.aux_classifier
    linear = layer.forward

    def joint(features: torch.Tensor) -> torch.Tensor:
        whole = state.get("features")
        if whole is None or features._base is not whole:
            return linear(features)
        row = (features.storage_offset() - whole.storage_offset()) // whole.stride(0)
        return state["aux"][row:row + features.shape[0]]

    layer.forward = joint


def align_usb_tras(usb: Any, items: set[str]) -> None:
    """Switch USB's TRAS to our design for each named TRAS item (module docstring)."""
    from bench.parity_usb import TRAS_WARMUP

    if "prior_sign" in items:   # USB's own expressions, from pi_l = n_c / sum(n) as the official compute_adjustment
        counts = torch.bincount(torch.as_tensor(usb.dataset_dict["train_lb"].targets), minlength=usb.num_classes)
        usb.lb_class_dist = counts.double() / counts.sum()
        usb.la = torch.log(usb.lb_class_dist ** usb.tro + 1e-12)
        usb.T_logit = usb.A * torch.softmax(-usb.la / 1, dim=0) + usb.B
        usb.tras_ce_loss.la = usb.la
    state: dict[str, torch.Tensor] = {}
    if "teacher_target" in items:
        # The joint forward's standard-head logits (the tensor USB's FixMatch step splits) and the target head's
        # weak-view pseudo-labels (the pseudo-labeling hook's second call of the step, TRAS's).
        usb.model.module.register_forward_hook(lambda module, args, output: state.update(logits=output["logits"]))
        labeler = usb.hooks_dict["PseudoLabelingHook"]
        generate = labeler.gen_ulb_targets

        def remember(*args: Any, **kwargs: Any) -> torch.Tensor:
            state["labels"] = generate(*args, **kwargs)
            return state["labels"]

        labeler.gen_ulb_targets = remember
    if "joint_head" in items:
        align_usb_joint_head(usb)
    kl, ce = usb.tras_kl_loss, usb.tras_ce_loss
    weight = (lambda: 0.0 if usb.it < TRAS_WARMUP else 1.0) if "warmup_zero" in items else (lambda: 1.0)

    def transfer(outputs: torch.Tensor, targets: torch.Tensor, T: float, mask: torch.Tensor) -> torch.Tensor:
        if "teacher_target" in items:
            strong = state["logits"][-outputs.shape[0]:]
            targets = strong.detach() - usb.la[None, :] * usb.T_logit[state["labels"]][:, None]
        return kl(outputs, targets, T, mask) * weight()

    usb.tras_kl_loss = transfer
    usb.tras_ce_loss = lambda *args, **kwargs: ce(*args, **kwargs) * weight()
    if "warmup_zero" in items:
        usb.warmup_epochs = 0


def run_oracle(algo: str, seed: int, steps: int, tol: float, items: set[str], out: Path, scored: bool,
               engine: Path, perturb: float, extra: list[str], saw_epoch: int) -> dict[str, Any]:
    """Lockstep run of both sides; prints a line per report step and the first divergence beyond `tol`."""
    epoch = [f"algorithm.epoch_length={saw_epoch}"] if algo == "saw" and saw_epoch else []
    trainer, replica, data, cfg = build_ours(algo, seed, out / "ours_cfg", engine, [*extra, *epoch])
    usb = start_usb(algo, seed, items, out, data, replica.model.state_dict(), perturb)
    if algo == "cossl":
        align_usb_cossl(usb, items, replica.algorithm)
    ours_tensors = tensor_groups(replica.model, replica.teacher.module)
    usb_tensors = usb_tensor_groups(usb, algo)
    first: dict[str, Any] | None = None
    mask_flips, history = 0, []
    generation_steps = steps // CREST_GENERATIONS if algo == "crest" else steps
    for step in range(steps):
        if step and step % generation_steps == 0:
            generation = step // generation_steps
            replica, picked = next_generation_ours(trainer, replica, data, cfg, generation)
            lb_images, lb_targets = next_generation_usb(usb, data, replica.model.state_dict(), generation)
            same = (np.array_equal(lb_images, picked.labeled_images.numpy())
                    and np.array_equal(lb_targets, picked.labeled_targets.numpy()))
            print(f"generation {generation + 1}: {len(picked.labeled_targets) - len(data.labeled_targets)} pseudo-labels "
                  f"join the labeled set, per class {picked.counts['labeled']}; USB's labeled set "
                  f"{'is identical' if same else 'DIFFERS'}", flush=True)
            if not same:
                raise SystemExit("the two sides picked different pseudo-labels: the oracle stops here")
            ours_tensors = tensor_groups(replica.model, replica.teacher.module)
        local = step % generation_steps
        rng = torch.get_rng_state()
        outputs = trainer.step(replica, local)
        b = replica.stream.last
        before_usb_step(usb, algo, local, rng)
        if algo == "cossl":
            feed_usb_cossl(usb, b, replica.algorithm, local, items)
        usb_step(usb, {"x_lb": b["x"].clone(), "y_lb": b["y"].clone(), "x_ulb_w": b["u_weak"].clone(),
                       "x_ulb_s": b["u_strong"][0].clone(), "idx_ulb": b["u_index"].clone()}, local)
        end_usb_epoch(usb, algo, step, saw_epoch)
        if algo == "cossl":   # USB's tfe_optimizer creates its momentum at its first step: read its state afresh
            usb_tensors = usb_tensor_groups(usb, algo)
        ours_mask, usb_mask = outputs["mask_rate"].item(), usb.log_dict["train/util_ratio"]
        mask_flips += round(abs(ours_mask - usb_mask) * BATCH * (len(b["u_weak"]) // BATCH))
        diff = differences(ours_tensors, usb_tensors)
        diff.update({group: (value, algo) for group, value in state_difference(algo, replica.algorithm, usb).items()})
        history.append({"step": step + 1, "mask": [ours_mask, usb_mask],
                        **{group: value for group, (value, _) in diff.items()}})
        above = {group: value for group, value in diff.items() if value[0] > tol}
        if above and first is None:
            first = {"step": step + 1, "groups": above, "mask_rate": [ours_mask, usb_mask]}
            print(f"first divergence > {tol:g} after step {step + 1}: {above} (mask rate ours {ours_mask:.4f}, "
                  f"USB {usb_mask:.4f})", flush=True)
        if step + 1 in REPORT_STEPS or step + 1 == steps:
            cells = "  ".join(f"{group} {value:.1e} ({name})" for group, (value, name) in diff.items())
            print(f"step {step + 1:5d}  {cells}  pseudo-label mask decisions differing so far: {mask_flips}",
                  flush=True)
    result: dict[str, Any] = {"algo": algo, "seed": seed, "steps": steps, "align": sorted(items), "tol": tol,
                              "ours_overrides": [*extra, *epoch],
                              "perturb": perturb, "engine": str(engine),
                              "first_divergence": first, "mask_decisions_differing": mask_flips, "history": history}
    if scored:
        for side, teacher, student in (("ours", replica.teacher.module, replica.model),
                                       ("usb", usb.ema_model, usb.model)):
            result[side] = score(data, {"ema": teacher, "student": student,
                                        "ema_bn_recalibrated": bn_recalibrated(teacher, data)})
        print("scores", json.dumps({k: result[k] for k in ("ours", "usb")}), flush=True)
    return result


def report(out: Path) -> str:
    """Markdown table of the scored runs in `out`: per seed, USB's side minus ours, teacher and student."""
    runs: dict[tuple[str, str, float], dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        if "ours" in result:
            key = (result["algo"], " ".join(result["align"]) or "none (USB as shipped)", result["perturb"], result["steps"])
            runs.setdefault(key, {})[result["seed"]] = result
    header = ("| algorithm | USB items switched to ours | perturbation | steps | model | ours (balanced acc, per seed) "
              "| USB side | USB side − ours, per seed | mean | largest relative difference at the end |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for (algo, align, perturb, steps), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        for model in ("ema", "student", "ema_bn_recalibrated"):
            if any(model not in by_seed[s]["ours"] for s in seeds):
                continue
            ours = [100 * by_seed[s]["ours"][model]["balanced_acc"] for s in seeds]
            usb = [100 * by_seed[s]["usb"][model]["balanced_acc"] for s in seeds]
            diff = [b - a for a, b in zip(ours, usb, strict=True)]
            group = "student" if model == "student" else "teacher"
            end = max(by_seed[s]["history"][-1][f"{group} {kind}"] for s in seeds for kind in ("param", "buffer"))
            label = {"ema": "teacher", "ema_bn_recalibrated": "teacher, BN statistics re-estimated"}.get(model, model)
            lines.append(f"| {algo} | {align} | {perturb:g} | {steps} | {label} | "
                         f"{' / '.join(f'{x:.1f}' for x in ours)} | {' / '.join(f'{x:.1f}' for x in usb)} | "
                         f"{' / '.join(f'{x:+.1f}' for x in diff)} | {sum(diff) / len(diff):+.1f} | {end:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["run", "report"], default="run")
    parser.add_argument("--algo", choices=["fixmatch", "daso", "debiaspl", "saw", "abc", "darp", "adsh", "tras",
                                           "crest", "cossl"],
                        default="fixmatch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-4, help="relative difference counted as a divergence")
    parser.add_argument("--align", nargs="*", default=[], choices=[*ALIGN_ITEMS, "all"],
                        help="DASO items where USB is switched to our design")
    parser.add_argument("--score", action="store_true", help="score both teachers and students on the test split")
    parser.add_argument("--out", type=Path, default=Path("/tmp/parity_oracle"))
    parser.add_argument("--perturb", type=float, default=0.0,
                        help="relative Gaussian noise on USB's initial weights (a chaos yardstick)")
    parser.add_argument("--ours", nargs="*", default=[], help="overrides for our side only (KEY=VALUE)")
    parser.add_argument("--saw-epoch", type=int, default=0, help="SAW: steps per epoch on both sides (0: the recipe's)")
    parser.add_argument("--engine", type=Path, default=REPO, help="checkout holding the ssl_imwa/ and configs/ to test")
    args = parser.parse_args()
    if args.command == "report":
        print(report(args.out))
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    items = set(ALIGN_ITEMS) if "all" in args.align else set(args.align)
    if "boundary" in items and "samebatch" not in items:
        parser.error("--align boundary needs samebatch: USB's next step would blend similarities never computed")
    for seed in args.seeds:
        result = run_oracle(args.algo, seed, args.steps, args.tol, items, args.out, args.score, args.engine,
                            args.perturb, args.ours, args.saw_epoch)
        tag = ("-".join(sorted(items)) or "usb") + (f"_perturb{args.perturb:g}" if args.perturb else "")
        tag += "".join(f"_{override}" for override in args.ours) + (f"_epoch{args.saw_epoch}" if args.saw_epoch else "")
        (args.out / f"{args.algo}_{tag}_s{seed}_n{args.steps}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
