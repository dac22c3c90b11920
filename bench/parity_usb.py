"""Whole-run parity with USB (microsoft/Semi-supervised-learning, PyPI `semilearn` 0.3.2).

Runs USB's FixMatch and DASO and ours on the same digits-LT split (experiment=cpu_digits_lt:
8x8 digits, gamma=10, N1=10, M1=100, consistent, split seed 0), the same small CNN, batch
size, mu, lr schedule, EMA, threshold and steps, and scores both EMA teachers on the same test
images with our metric code (balanced accuracy and top-1). Results: docs/results/parity_usb.md.

Setup (USB lives outside the repository; torch comes from the system site packages):

    python -m venv --system-site-packages /tmp/usb_venv
    /tmp/usb_venv/bin/pip install --no-deps semilearn==0.3.2 tqdm scikit-image timm \
        ruamel.yaml ruamel.yaml.clib tensorboard progress lazy_loader tifffile imageio networkx

USB imports transformers, torchaudio, wandb and aim at import time but never uses them on the
vision path; this driver writes empty stand-ins for them (--stubs) and puts them on sys.path.

Run (one run at a time; --impl ours calls `python main.py`, --impl usb imports semilearn):

    /tmp/usb_venv/bin/python bench/parity_usb.py run --impl usb --algo fixmatch --seeds 0 1 2
    /tmp/usb_venv/bin/python bench/parity_usb.py run --impl ours --algo fixmatch --seeds 0 1 2
    /tmp/usb_venv/bin/python bench/parity_usb.py report   # prints the markdown table

Augmentation: USB's data pipeline (PIL RandAugment on 32-px RGB) is not used; both sides get
batches from OUR weak/strong augmentation of the same uint8 images, so the comparison isolates
the algorithm, optimizer, EMA and training loop. USB draws batch indices as its RandomSampler
does (with replacement); ours uses its own stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
STUB_MODULES = {
    "transformers": ["BertModel", "Wav2Vec2Model", "AutoFeatureExtractor", "BertTokenizer",
                     "BertTokenizerFast", "HubertModel"],
    "transformers.data": ["default_data_collator"],
    "transformers.file_utils": ["PaddingStrategy"],
    "transformers.tokenization_utils_base": ["PreTrainedTokenizerBase"],
    "torchaudio": [],
    "wandb": [],
    "aim": [],
}
# The setting shared by both sides (experiment=cpu_digits_lt and the choices in the module docstring).
STEPS, BATCH, LR, WD, THRESHOLD, EMA_DECAY, BN_MOMENTUM = 1000, 32, 0.03, 5e-4, 0.95, 0.999, 0.001
MU = {"fixmatch": 7, "daso": 2, "daso_samebatch": 2, "debiaspl": 2, "saw": 2, "abc": 2, "darp": 2, "adsh": 2, "tras": 2,
      "crest": 2, "cossl": 2}
IMB_ON_FIXMATCH = ("daso", "daso_samebatch", "debiaspl", "saw", "abc", "darp", "adsh", "tras", "crest", "cossl")  # USB classes mixed into its FixMatch
DASO_WARMUP, DASO_PERIOD = 20, 1  # daso_short: 0.02 and 0.0004 of 1,000 steps (the period rounds up to 1)
# DARP: 10-step epochs, refinement from epoch 5 (step 50), the solver every 10 steps, on both sides.
DARP_EPOCH, DARP_WARMUP_EPOCHS, DARP_PERIOD = 10, 4, 10
# ADSH: 50-step epochs on both sides (the recipe's 1,024-step epoch never ends in a short run).
ADSH_EPOCH = 50
# TRAS: the target head joins after 20 steps on both sides (USB: 20-step epochs, tras_warmup_epochs 1).
TRAS_WARMUP = 20
# CReST+: two generations on both sides (the oracle's --steps split between them), the recipe's alpha and T.
CREST_GENERATIONS = 2
# CoSSL: 50-step epochs on both sides, the classifier warm-up at the start of epoch 1 (step 50; USB cossl_warm_epoch 1,
# ours algorithm.warmup=50), its 10 epochs of COSSL_CLASSIFIER_STEPS Adam steps (USB num_eval_iter).
COSSL_EPOCH, COSSL_CLASSIFIER_STEPS = 50, 100
EVAL_BATCH = 1000   # USB eval_batch_size here; experiment=cpu_digits_lt's train.eval_batch_size (our passes' chunks)


def write_stubs(stub_dir: Path) -> None:
    """Empty modules for USB's import-time dependencies that the vision path never calls."""
    for module, names in STUB_MODULES.items():
        path = stub_dir.joinpath(*module.split("."))
        path.mkdir(parents=True, exist_ok=True)
        body = "".join(f"class {name}:\n    pass\n\n\n" for name in names if name[0].isupper())
        body += "".join(f"def {name}(*args, **kwargs):\n    raise RuntimeError('stub')\n\n\n"
                        for name in names if not name[0].isupper())
        (path / "__init__.py").write_text(body or "\n")


def build_split() -> Any:
    """Our SSLData for experiment=cpu_digits_lt, rebuilt with the same functions main.py uses."""
    sys.path.insert(0, str(REPO))
    from ssl_imwa.data.build import build_data
    from ssl_imwa.data.config import DatasetConfig

    cfg = DatasetConfig(name="digits", protocol="disjoint", n_max=10, m_max=100, imbalance=10.0,
                        unlabeled="consistent", val_per_class=0, split_seed=0, image_size=None, hflip=False)
    return build_data(cfg)


class USBNet(nn.Module):
    """Our small CNN answering USB's contract: forward returns {'logits', 'feat'}; num_features."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        from ssl_imwa.models import create_model

        self.net = create_model("small_cnn", num_classes=num_classes, in_channels=in_channels,
                                bn_momentum=BN_MOMENTUM)
        self.num_features = self.net.feature_dim

        self.tap: Any = None  # set by the same-batch DASO variant (see run_usb)

    def forward(self, x: torch.Tensor, only_feat: bool = False) -> Any:
        out = self.net(x)
        if self.tap is not None:
            self.tap(x, out["features"])
        return out["features"] if only_feat else {"logits": out["logits"], "feat": out["features"]}


def usb_args(algo: str, seed: int, num_classes: int) -> SimpleNamespace:
    """USB's settings as its argparse would give them, matched to ours."""
    args: dict[str, Any] = {
        "algorithm": "fixmatch", "num_classes": num_classes, "ema_m": EMA_DECAY, "epoch": 1, "num_train_iter": STEPS,
        "num_eval_iter": STEPS, "num_log_iter": STEPS, "ulb_loss_ratio": 1.0, "use_cat": True, "amp": False, "clip_grad": 0.0,
        "save_name": "parity", "save_dir": "/tmp/parity/usb_save", "resume": False, "gpu": None, "rank": 0, "distributed": False,
        "world_size": 1, "optim": "SGD", "lr": LR, "momentum": 0.9, "weight_decay": WD, "layer_decay": 1.0, "num_warmup_iter": 0,
        "use_pretrain": False, "pretrain_path": "", "batch_size": BATCH, "uratio": MU[algo], "eval_batch_size": 1000,
        "use_wandb": False, "use_aim": False, "T": 1.0, "p_cutoff": THRESHOLD, "hard_label": True, "seed": seed, "net": "small_cnn",
        "dataset": "digits", "lb_imb_ratio": 10, "ulb_imb_ratio": 10, "imb_algorithm": None,
    }
    if algo.startswith("daso"):
        args.update(imb_algorithm="daso", daso_queue_len=256, daso_T_proto=0.05, daso_T_dist=1.5,
                    daso_interp_alpha=0.5, daso_with_dist_aware=True, daso_assign_loss_ratio=1.0,
                    daso_num_pl_dist_iter=DASO_PERIOD, daso_num_pretrain_iter=DASO_WARMUP)
    if algo == "debiaspl":   # USB's argparse defaults (semilearn/imb_algorithms/debiaspl/debiaspl.py)
        args.update(imb_algorithm="debiaspl", debiaspl_tau=0.4, debiaspl_ema_p=0.999)
    if algo == "saw":
        args.update(imb_algorithm="saw")
    if algo == "adsh":   # USB's argparse default adsh_tau_1 (its config files leave it)
        args.update(imb_algorithm="adsh", adsh_tau_1=THRESHOLD)
    if algo == "abc":   # USB's config for CIFAR-10-LT (abc_p_cutoff, abc_loss_ratio; epoch: 256 schedule epochs)
        args.update(imb_algorithm="abc", abc_p_cutoff=THRESHOLD, abc_loss_ratio=1.0, epoch=256)
    if algo == "darp":   # USB's config for CIFAR-10-LT (alpha 2, iter_T 10), the schedule above
        args.update(imb_algorithm="darp", darp_alpha=2.0, darp_iter_T=10, darp_num_refine_iter=DARP_PERIOD,
                    darp_warmup_epochs=DARP_WARMUP_EPOCHS, epoch=STEPS // DARP_EPOCH)
    if algo == "tras":   # USB's generator for CIFAR-10-LT (A 2, B 2, tro 1, 1 warm-up epoch), TRAS_WARMUP-step epochs
        args.update(imb_algorithm="tras", tras_A=2, tras_B=2, tras_tro=1.0, tras_warmup_epochs=1,
                    epoch=STEPS // TRAS_WARMUP)
    if algo == "cossl":   # USB's config for CIFAR-10-LT, with COSSL_EPOCH-step epochs and a 1-epoch warm-up
        args.update(imb_algorithm="cossl", cossl_max_lam=0.6, cossl_tfe_augment="strong", cossl_tfe_u_ratio=1,
                    cossl_warm_epoch=1, cossl_tfe_warm_epoch=10, cossl_tfe_warm_lr=0.02,
                    cossl_tfe_warm_ema_decay=0.999, cossl_tfe_warm_wd=5e-4, cossl_tfe_warm_bs=64,
                    epoch=STEPS // COSSL_EPOCH, num_eval_iter=COSSL_CLASSIFIER_STEPS)
    if algo == "crest":   # USB's config for CIFAR-10-LT (alpha 3) with its CReST+ alignment (argparse defaults)
        args.update(imb_algorithm="crest", crest_num_gens=CREST_GENERATIONS, crest_dist_align_t=0.5,
                    crest_pro_dist_align=True, crest_alpha=3.0)
    return SimpleNamespace(**args)


def build_usb(algo: str, seed: int, out: Path, data: Any) -> Any:
    """USB's algorithm for `algo` on our net, with USB's optimizer, schedule and training hooks, before `before_run`.

    Patches USB's AlgorithmBase for the whole process: no datasets or loaders of its own (our split
    replaces them) and no `.cuda()` in `process_batch` (this runs on CPU).
    """
    write_stubs(out / "stubs")
    if str(out / "stubs") not in sys.path:
        sys.path.insert(0, str(out / "stubs"))
    import semilearn.core.algorithmbase as base
    from semilearn.algorithms.fixmatch import FixMatch
    from semilearn.core.utils import get_optimizer
    from semilearn.imb_algorithms import get_imb_algorithm

    num_classes, channels = data.num_classes, data.in_channels

    def set_none(self: Any) -> None:
        return None

    def on_cpu(self: Any, input_args: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        names = input_args or list(__import__("inspect").signature(self.train_step).parameters)
        return {k: v for k, v in kwargs.items() if k in names and v is not None}

    base.AlgorithmBase.set_dataset = set_none  # our split replaces USB's sampler of its own datasets
    base.AlgorithmBase.set_data_loader = set_none
    base.AlgorithmBase.process_batch = on_cpu  # USB moves every tensor with .cuda(); this run is on CPU
    if algo == "saw":
        patch_usb_saw(data)
    if algo == "adsh":
        patch_usb_adsh(data)
    if algo == "abc":
        patch_usb_abc(data)
    if algo == "darp":
        patch_usb_darp(data)
    if algo == "tras":
        patch_usb_tras(data)
    if algo == "crest":
        patch_usb_crest(data)
    if algo == "cossl":
        patch_usb_cossl(data)
    settings = usb_args(algo, seed, num_classes)

    def net_builder(num_classes: int, **_: Any) -> USBNet:
        return (CoSSLUSBNet if algo == "cossl" else USBNet)(num_classes, channels)

    # DASO is USB's class mixing DASO into FixMatch, built the way USB's train.py builds it.
    algorithm = (get_imb_algorithm(settings, net_builder, None, None) if algo in IMB_ON_FIXMATCH
                 else FixMatch(settings, net_builder))
    if algo == "daso_samebatch":
        # USB blends in `probs_sim` that DASO.train_step sets AFTER the FixMatch step returns, i.e. the
        # previous batch's. This variant sets it from the current batch's weak-view features during the
        # joint forward, before the pseudo-labeling hook reads it (the official ytaek-oh/daso order).
        def same_batch(x: torch.Tensor, feats: torch.Tensor) -> None:
            if x.shape[0] != BATCH * (1 + 2 * MU[algo]) or algorithm.it < DASO_WARMUP:
                return
            weak = feats[BATCH:].chunk(2)[0].detach()
            with torch.no_grad():
                protos = algorithm.queue.prototypes
                sim = algorithm.similarity_fn(weak.unsqueeze(1), protos.unsqueeze(0)) / algorithm.T_proto
                algorithm.probs_sim = sim.softmax(dim=1)

        algorithm.model.tap = same_batch
    if algo in ("abc", "tras", "cossl"):   # USB's train.py wraps both nets (send_model_cuda); their train_step reads model.module
        algorithm.model = nn.DataParallel(algorithm.model)   # with no GPU a pass-through
        algorithm.ema_model = nn.DataParallel(algorithm.ema_model)
    # USB's optimizer: SGD, Nesterov; its param groups never decay biases or 1-d parameters (BN), whatever
    # bn_wd_skip says (semilearn/nets/utils.py param_groups_weight_decay), so ours runs with
    # train.wd_exclude_bias_bn=true. Cosine schedule for FixMatch (USB's default), constant lr for DASO
    # (USB's ImbAlgorithmBase.set_optimizer on CIFAR-style datasets).
    algorithm.optimizer = get_optimizer(algorithm.model, "SGD", LR, 0.9, WD, 1.0, bn_wd_skip=False)
    if algo in IMB_ON_FIXMATCH:
        algorithm.scheduler = None
    else:
        from semilearn.core.utils import get_cosine_schedule_with_warmup
        algorithm.scheduler = get_cosine_schedule_with_warmup(algorithm.optimizer, STEPS, num_warmup_steps=0)
    # DebiasPL registers its hook under the name "NORMAL" (its priority passed as the name).
    keep = {"ParamUpdateHook", "EMAHook", "PseudoLabelingHook", "MaskingHook", "NORMAL", "SAWWeightsHook",
            "DistAlignHook"}
    algorithm._hooks = [h for h in algorithm._hooks if h.name in keep]
    algorithm.hooks_dict = {h.name: h for h in algorithm._hooks}
    algorithm.model.train()
    return algorithm


def patch_usb_abc(data: Any) -> None:
    """USB's ABC reads the labeled targets (its N_min / N_c) from its own labeled dataset; here from our split."""
    from semilearn.imb_algorithms.abc import ABC

    ABC.set_dataset = lambda self: {"train_lb": SimpleNamespace(targets=data.labeled_targets.numpy())}


def patch_usb_tras(data: Any) -> None:
    """USB's TRAS reads the labeled targets (its class distribution) from its own labeled dataset; here from our
    split. Its train_step moves the class strengths with `.cuda()`; this run is on CPU."""
    from semilearn.imb_algorithms.tras import TRAS

    TRAS.set_dataset = lambda self: {"train_lb": SimpleNamespace(targets=data.labeled_targets.numpy())}
    if not hasattr(TRAS.train_step, "on_host"):   # once per process (one build per seed)
        TRAS.train_step = on_host(TRAS.train_step)
        TRAS.train_step.on_host = True


def patch_usb_darp(data: Any) -> None:
    """USB's DARP reads the labeled targets and the unlabeled set's size from its own datasets; here from our
    split. Its pseudo-labeling hook moves the refined labels with `.cuda()`; this run is on CPU."""
    from semilearn.imb_algorithms.darp import DARP
    from semilearn.imb_algorithms.darp.utils import DARPPseudoLabelingHook

    DARP.set_dataset = lambda self: {"train_lb": SimpleNamespace(targets=data.labeled_targets.numpy()),
                                     "train_ulb": [None] * len(data.unlabeled_images)}
    DARPPseudoLabelingHook.refine_pseudo_labels = on_host(DARPPseudoLabelingHook.refine_pseudo_labels)


def patch_usb_saw(data: Any) -> None:
    """USB's SAW reads the labeled targets and the unlabeled set's size from its own datasets and adds an
    `eval_ulb` loader; here both come from our split, and its end-of-epoch pass over the unlabeled images
    (`evaluate('eval_ulb')`: the EMA weights in eval mode; USB's own loader would apply the weak crop and
    flip) runs on our unaugmented tensors."""
    from semilearn.imb_algorithms.saw import SAW
    from semilearn.imb_algorithms.saw.utils import SAWWeightsHook

    def datasets(self: Any) -> dict[str, Any]:
        return {"train_lb": SimpleNamespace(targets=data.labeled_targets.numpy()),
                "train_ulb": [None] * len(data.unlabeled_images)}

    SAW.set_dataset = datasets
    SAW.set_data_loader = lambda self: None
    SAW.evaluate = usb_unlabeled_pass(data)
    for name in ("before_run", "after_train_epoch"):   # both move the weights with .cuda(); this run is on CPU
        setattr(SAWWeightsHook, name, on_host(getattr(SAWWeightsHook, name)))


def patch_usb_crest(data: Any) -> None:
    """USB's CReST reads the labeled targets (its class distribution) from its own labeled dataset and adds an
    `eval_ulb` loader; here the targets come from our split, and its end-of-generation pass
    (`evaluate('eval_ulb')`) reads our unlabeled images as our pass does (usb_unlabeled_pass)."""
    from semilearn.imb_algorithms.crest import CReST

    CReST.set_dataset = lambda self: {"train_lb": SimpleNamespace(targets=data.labeled_targets.numpy())}
    CReST.set_data_loader = lambda self: None
    CReST.evaluate = usb_unlabeled_pass(data)


def patch_usb_adsh(data: Any) -> None:
    """USB's ADSH adds an `eval_ulb` loader over its own unlabeled set; here its end-of-epoch pass
    (`evaluate('eval_ulb')`: the EMA weights, the model in eval mode) reads our unlabeled images in our
    pass's batches and order, unaugmented as our pass reads them (USB's eval_ulb applies train_ulb's weak
    transform, a random crop and flip: docs/algorithms.md)."""
    from semilearn.imb_algorithms.adsh import Adsh

    Adsh.set_dataset = lambda self: None
    Adsh.set_data_loader = lambda self: None
    Adsh.evaluate = usb_unlabeled_pass(data)


class CoSSLUSBNet(USBNet):
    """USBNet with the `classifier` USB's CoSSL_Net takes as its standard head (our net's head, not a copy)."""

    @property
    def classifier(self) -> nn.Module:
        return self.net.heads["logits"]


class PassImages:
    """A stand-in for USB's labeled or unlabeled dataset in its CoSSL classifier warm-up: its loaders over it
    (cossl_pass_loader) read our images as our dataset pass does."""

    def __init__(self, data: Any, labeled: bool) -> None:
        self.data, self.labeled = data, labeled
        self.targets = data.labeled_targets.numpy() if labeled else data.unlabeled_targets.numpy()


class StepFeed:
    """USB's CoSSL co-learning loaders (tfe_train_lb, tfe_train_ulb): each `next` hands the batch the oracle set
    for this step (`usb.cossl_feed`, from our step's class-balanced batch and strong views)."""

    def __init__(self, algorithm: Any, part: str) -> None:
        self.algorithm, self.part = algorithm, part

    def __iter__(self) -> StepFeed:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.algorithm.cossl_feed[self.part]


def cossl_pass_loader(dataset: Any, batch_size: int = 1, shuffle: bool = False, sampler: Any = None,
                      **kwargs: Any) -> Any:
    """USB's CoSSL warm-up builds its loaders with this (patch_usb_cossl): over a PassImages, our unaugmented
    images in our pass's chunks and order (USB: the weak view of the labeled images; the strong view's features
    and the weak view's probabilities of the unlabeled ones); over its feature set, PyTorch's DataLoader, its
    shuffling order replaced by `cossl_orders` where that is set (the oracle's --align rng)."""
    from ssl_imwa.data.stream import eval_batches

    if isinstance(dataset, PassImages):
        data = dataset.data
        images, targets = ((data.labeled_images, data.labeled_targets) if dataset.labeled
                           else (data.unlabeled_images, data.unlabeled_targets))
        return [{"x_lb": x, "y_lb": y} if dataset.labeled else {"x_ulb_w": x, "x_ulb_s": x}
                for x, y in eval_batches(images, targets, EVAL_BATCH, data.mean, data.std)]
    if shuffle and COSSL_ORDERS:
        sampler, shuffle = OrderFeed(COSSL_ORDERS), False
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **kwargs)


# The warm-up feature set's orders, one per pass of its loader (filled by the oracle's --align rng; empty: USB's own).
COSSL_ORDERS: list[torch.Tensor] = []


class OrderFeed(torch.utils.data.Sampler):
    """A sampler that yields the next of the given orders each time a loader starts a pass over it."""

    def __init__(self, orders: list[torch.Tensor]) -> None:
        self.orders = orders

    def __iter__(self) -> Any:
        return iter(self.orders.pop(0).tolist())

    def __len__(self) -> int:
        return len(self.orders[0])


def patch_usb_cossl(data: Any) -> None:
    """USB's CoSSL reads its labeled and unlabeled datasets (the labeled counts; the classifier warm-up's loaders)
    and builds two loaders of its own for the co-learning batches. Here the warm-up's loaders read our images as
    our dataset pass does (cossl_pass_loader), the co-learning loaders hand the oracle's batch of each step
    (StepFeed), and the `.cuda()` calls and CUDA timing of its step and hooks do nothing (this runs on CPU)."""
    import semilearn.imb_algorithms.cossl.utils as cossl_utils
    from semilearn.imb_algorithms.cossl.cossl import CoSSL, CoSSLParamUpdateHook

    def datasets(self: Any) -> dict[str, Any]:
        return {"train_lb": PassImages(data, labeled=True), "train_ulb": PassImages(data, labeled=False)}

    def loaders(self: Any) -> dict[str, Any]:
        self.lb_cnt_per_class = np.bincount(data.labeled_targets.numpy(), minlength=self.num_classes)
        return {"tfe_train_lb": StepFeed(self, "labeled"), "tfe_train_ulb": StepFeed(self, "unlabeled")}

    CoSSL.set_dataset = datasets
    CoSSL.set_data_loader = loaders
    cossl_utils.data = SimpleNamespace(DataLoader=cossl_pass_loader, dataset=torch.utils.data.dataset)
    if not hasattr(CoSSL.train_step, "on_host"):   # once per process (one build per seed)
        CoSSL.train_step = on_host(CoSSL.train_step)
        CoSSLParamUpdateHook.before_train_epoch = on_host(modules_on_host(CoSSLParamUpdateHook.before_train_epoch))
        CoSSLParamUpdateHook.after_train_step = without_cuda_timing(CoSSLParamUpdateHook.after_train_step)
        CoSSL.train_step.on_host = True


def modules_on_host(hook: Any) -> Any:
    """`hook` with `nn.Module.cuda` the identity while it runs (CoSSL's classifier warm-up moves its nets)."""
    return cuda_as_identity(nn.Module, hook)


def without_cuda_timing(hook: Any) -> Any:
    """`hook` with USB's CUDA timing (its events and torch.cuda.synchronize) inert: USB's update hook times each
    step with them, and this run is on CPU."""
    event = SimpleNamespace(record=lambda: None, elapsed_time=lambda other: 0.0)

    def wrapped(self: Any, algorithm: Any, *args: Any, **kwargs: Any) -> Any:
        synchronize = torch.cuda.synchronize
        algorithm.start_run = algorithm.end_run = event
        torch.cuda.synchronize = lambda *a, **k: None
        try:
            return hook(self, algorithm, *args, **kwargs)
        finally:
            torch.cuda.synchronize = synchronize
            del algorithm.start_run, algorithm.end_run   # the base hook's before_train_step times when they exist

    return wrapped


def usb_unlabeled_pass(data: Any) -> Any:
    """USB's `evaluate('eval_ulb', return_logits=True)` (the EMA weights, the model in eval mode) over our
    unlabeled images, in our pass's batches and order and unaugmented as our pass reads them (USB's own
    eval_ulb loader applies train_ulb's weak crop and flip): SAW's and ADSH's end-of-epoch pass."""
    from ssl_imwa.data.stream import eval_batches

    def evaluate_ulb(self: Any, eval_dest: str = "eval", out_key: str = "logits", return_logits: bool = False
                     ) -> dict[str, Any]:
        assert eval_dest == "eval_ulb" and return_logits
        self.model.eval()
        self.ema.apply_shadow()
        with torch.no_grad():
            logits = [self.model(images)[out_key] for images, _ in eval_batches(
                data.unlabeled_images, data.unlabeled_targets, self.args.eval_batch_size, data.mean, data.std)]
        self.ema.restore()
        self.model.train()
        return {"eval_ulb/logits": torch.cat(logits).numpy()}

    return evaluate_ulb


def on_host(hook: Any) -> Any:
    """`hook` with `Tensor.cuda` the identity while it runs (USB's hooks call it unconditionally)."""
    return cuda_as_identity(torch.Tensor, hook)


def cuda_as_identity(owner: type, hook: Any) -> Any:
    """`hook` with `owner.cuda` returning its object unchanged while it runs: this CPU run keeps USB's calls."""

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        cuda = owner.cuda
        owner.cuda = lambda obj, *args, **kwargs: obj
        try:
            return hook(self, *args, **kwargs)
        finally:
            owner.cuda = cuda

    return wrapped


def usb_step(algorithm: Any, batch: dict[str, torch.Tensor], it: int) -> None:
    """One USB iteration as its `train()` loop runs it: hooks before, `train_step`, hooks after (update, EMA)."""
    algorithm.it = it
    algorithm.call_hook("before_train_step")
    algorithm.out_dict, algorithm.log_dict = algorithm.train_step(**algorithm.process_batch(**batch))
    algorithm.call_hook("after_train_step")


def score(data: Any, models: dict[str, nn.Module]) -> dict[str, Any]:
    """Top-1 and balanced accuracy on the test split, each model in eval mode, with our metric code."""
    from ssl_imwa.data.transforms import normalize
    from ssl_imwa.metrics import class_groups, classification_metrics

    results: dict[str, Any] = {}
    test = normalize(data.test_images, data.mean, data.std)
    groups = class_groups(data.counts["labeled"])
    for name, model in models.items():
        mode = model.training
        model.eval()
        with torch.no_grad():
            logits = model(test)["logits"]
        model.train(mode)
        m = classification_metrics(logits.argmax(1), data.test_targets, data.num_classes, groups)
        results[name] = {"top1": m["top1"], "balanced_acc": m["balanced_acc"]}
    return results


def run_usb(algo: str, seed: int, out: Path, threads: int) -> dict[str, Any]:
    """Train USB's algorithm with our data, our net and USB's own step, hooks (update, EMA) and loop order."""
    torch.set_num_threads(threads)
    from ssl_imwa.data.transforms import normalize, strong_augment, weak_augment

    data = build_split()
    split = {"labeled": data.split.labeled.tolist(), "unlabeled": data.split.unlabeled.tolist()}
    (out / "split_indices.json").write_text(json.dumps(split))  # indices into the digits training set
    torch.manual_seed(seed)
    np.random.seed(seed)
    algorithm = build_usb(algo, seed, out, data)

    gen = torch.Generator().manual_seed(seed)
    mean, std = data.mean, data.std
    n_lb, n_ulb, mu = len(data.labeled_targets), len(data.unlabeled_images), MU[algo]
    algorithm.call_hook("before_run")
    for it in range(STEPS):
        lb = torch.randint(n_lb, (BATCH,), generator=gen)
        ulb = torch.randint(n_ulb, (BATCH * mu,), generator=gen)
        x_lb = normalize(weak_augment(data.labeled_images[lb], gen, data.pad, data.hflip), mean, std)
        u = data.unlabeled_images[ulb]
        x_w = normalize(weak_augment(u, gen, data.pad, data.hflip), mean, std)
        x_s = normalize(strong_augment(u, gen, data.pad, data.hflip, data.cutout), mean, std)
        batch = {"x_lb": x_lb, "y_lb": data.labeled_targets[lb], "x_ulb_w": x_w, "x_ulb_s": x_s,
                 "idx_lb": lb, "idx_ulb": ulb}
        usb_step(algorithm, batch, it)
    algorithm.it = STEPS
    return score(data, {"ema": algorithm.ema_model, "student": algorithm.model})


def our_overrides(algo: str, seed: int, threads: int) -> list[str]:
    """Our main.py overrides that match USB (each one documented in docs/results/parity_usb.md)."""
    overrides = ["experiment=cpu_digits_lt", f"seed={seed}", "algorithm.ema.warmup=false",
                 f"model.bn_momentum={BN_MOMENTUM}", "train.wd_exclude_bias_bn=true", f"train.num_threads={threads}",
                 "train.progress=false"]
    if algo == "darp":   # its recipe is USB's; the schedule of DARP_EPOCH and the lines after it
        return overrides + ["algorithm=darp", f"algorithm.epoch_length={DARP_EPOCH}",
                            f"algorithm.warmup_epochs={DARP_WARMUP_EPOCHS}", f"algorithm.refine_every={DARP_PERIOD}"]
    if algo in ("debiaspl", "saw", "abc"):   # their recipes are USB's (mu 2, constant lr, EMA and BN as USB)
        return overrides + [f"algorithm={algo}"]
    if algo == "tras":   # its recipe is USB's, with the TRAS_WARMUP-step warm-up
        return overrides + ["algorithm=tras", f"algorithm.warmup={TRAS_WARMUP}"]
    if algo == "cossl":   # its recipe is USB's, the classifier warm-up at step COSSL_EPOCH, shorter warm-up epochs
        return overrides + ["algorithm=cossl", f"algorithm.warmup={COSSL_EPOCH}",
                            f"algorithm.classifier_epoch_steps={COSSL_CLASSIFIER_STEPS}"]
    if algo == "crest":   # CReST+ with USB's recipe, CREST_GENERATIONS generations
        return overrides + ["algorithm=crest_plus", f"algorithm.generations={CREST_GENERATIONS}"]
    if algo == "adsh":   # its recipe is USB's, with ADSH_EPOCH-step epochs
        return overrides + ["algorithm=adsh", f"algorithm.epoch_length={ADSH_EPOCH}"]
    if algo.startswith("daso"):
        return overrides + ["algorithm=daso_short", "algorithm.ema.buffers=copy", f"train.mu={MU[algo]}",
                            "train.schedule=constant"]
    return overrides + ["algorithm=fixmatch"]


def run_ours(algo: str, seed: int, out: Path, threads: int) -> dict[str, Any]:
    """Our main.py with the overrides that match USB (each one documented in docs/results/parity_usb.md)."""
    run_dir = out / f"ours_{algo}_s{seed}"
    overrides = [*our_overrides(algo, seed, threads), f"hydra.run.dir={run_dir}"]
    if not (run_dir / "results.json").exists():
        with open(out / f"ours_{algo}_s{seed}.log", "w") as log:
            subprocess.run([sys.executable, "main.py", *overrides], cwd=REPO, check=True,
                           stdout=log, stderr=subprocess.STDOUT)
    return read_ours(run_dir)


def read_ours(run_dir: Path) -> dict[str, Any]:
    """Our run's final EMA teacher and student, re-scored on the test split with our metric code."""
    import ssl_imwa
    from ssl_imwa.metrics import class_groups, classification_metrics

    run = ssl_imwa.load_run(str(run_dir), device="cpu")
    groups = class_groups(run.data.counts["labeled"])
    results: dict[str, Any] = {}
    for name, model in (("ema", "teacher"), ("student", "student")):
        preds = run.predict(run.data.test_images, model=model)
        m = classification_metrics(preds, run.data.test_targets, run.data.num_classes, groups)
        results[name] = {"top1": m["top1"], "balanced_acc": m["balanced_acc"]}
    return results


def _mean_std(values: list[float]) -> str:
    """Percent mean ± sample std."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def report(out: Path) -> str:
    """Markdown table: mean ± std per implementation and the paired differences per seed.

    'Within seed noise' means |mean paired difference| <= the larger of the two seed stds.
    """
    header = ("| comparison (B − A) | model | metric | A (mean ± std) | B (mean ± std) | B − A, per seed "
              "| mean diff ± std | within seed noise? |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    # (label, baseline file prefix, compared file prefix): ours against USB, and USB's DASO with the
    # same-batch similarities against USB's DASO as shipped.
    pairs = [("fixmatch: ours − USB", "usb_fixmatch", "ours_fixmatch"), ("daso: ours − USB", "usb_daso", "ours_daso"),
             ("daso: USB same-batch − USB", "usb_daso", "usb_daso_samebatch")]
    for label, first, second in pairs:
        seeds = [s for s in (0, 1, 2) if (out / f"{first}_s{s}.json").exists() and (out / f"{second}_s{s}.json").exists()]
        if not seeds:
            continue
        for model, metric in [(m, k) for m in ("ema", "student") for k in ("balanced_acc", "top1")]:
            a = [json.loads((out / f"{first}_s{s}.json").read_text())[model][metric] for s in seeds]
            b = [json.loads((out / f"{second}_s{s}.json").read_text())[model][metric] for s in seeds]
            d = [y - x for x, y in zip(a, b, strict=True)]
            noise = max(statistics.stdev(a), statistics.stdev(b)) if len(seeds) > 1 else float("nan")
            within = ("yes" if abs(statistics.mean(d)) <= noise else "no") if len(seeds) > 1 else "n/a"
            lines.append(f"| {label} | {model} | {metric} | {_mean_std(a)} | {_mean_std(b)} | "
                         f"{' / '.join(f'{100 * x:+.1f}' for x in d)} | {_mean_std(d)} | {within} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--impl", choices=["usb", "ours"], default="usb")
    parser.add_argument("--algo", choices=["fixmatch", "daso", "daso_samebatch"], default="fixmatch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/parity"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    if args.command == "report":
        print(report(args.out))
        return
    for seed in args.seeds:
        runner = run_usb if args.impl == "usb" else run_ours
        result = runner(args.algo, seed, args.out, args.threads)
        (args.out / f"{args.impl}_{args.algo}_s{seed}.json").write_text(json.dumps(result, indent=1))
        print(args.impl, args.algo, seed, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
