"""One replica's training: optimiser, lr schedule, mixed precision, EMA update, one step at a time."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_imwa.algorithm import Algorithm, DatasetPass
from ssl_imwa.config import TrainConfig
from ssl_imwa.distributed import Communicator
from ssl_imwa.ema import EMATeacher

IMAGE_KEYS = ("x", "u_weak", "x_balanced")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for global step `step` (0-based) of `cfg.iterations`."""
    if cfg.schedule == "cosine":
        return cfg.lr * math.cos(7.0 * math.pi * step / (16.0 * cfg.iterations))
    return cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; optionally no weight decay on biases and BN parameters (ndim <= 1).

    On CUDA the fused kernel: one launch per step, and with fp16 the grad scaler's inf check stays
    on the device (with the default implementation `GradScaler.step` reads it back: a sync per step).
    Elsewhere the default (foreach) implementation, whose results the CPU tests pin bitwise.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        (no_decay if cfg.wd_exclude_bias_bn and parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = all(parameter.device.type == "cuda" for parameter in model.parameters())
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A context factory for the forward pass: bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = PRECISION_DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Replica:
    """Everything one replica owns; kept resident across IMWA episodes."""

    index: int
    model: nn.Module
    teacher: EMATeacher
    optimizer: torch.optim.SGD
    algorithm: Algorithm
    stream: Any  # ssl_imwa.data.TrainStream
    scaler: torch.amp.GradScaler | None
    # imwa.data_parallel > 1: the DistributedDataParallel wrapper of `model` that the algorithm forwards.
    wrapped: nn.Module | None = None

    @property
    def forward_model(self) -> nn.Module:
        """What the algorithm calls: the model, or its DDP wrapper (which averages the slices' gradients)."""
        return self.model if self.wrapped is None else self.wrapped

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "stream": self.stream.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.stream.load_state_dict(state["stream"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


class Trainer:
    """Runs optimisation steps of a replica at given global steps; knows nothing of episodes.

    With a data-parallel group (D > 1) this process trains on its slice of each batch through the
    replica's DDP wrapper; after each step the BN buffers are process 0's everywhere, so the D
    copies of a replica (student, teacher, optimiser) stay identical and one checkpoint holds them.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, data_parallel: Communicator | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.autocast = autocast_factory(cfg.precision, device)
        self.data_parallel = data_parallel or Communicator(device=device)

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.cfg.channels_last:
            return batch
        to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)
        prepared = dict(batch)
        for key in IMAGE_KEYS:
            if key in prepared and prepared[key].dim() == 4:
                prepared[key] = to_cl(prepared[key])
        for key in ("u_strong", "x_strong"):
            if key in prepared:
                prepared[key] = [to_cl(view) for view in prepared[key]]
        return prepared

    def step(self, replica: Replica, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step at step `step` of the schedule (the global step, or the step within the
        generation where the algorithm chains generations); returns the algorithm's (detached) outputs."""
        if step in replica.algorithm.dataset_pass_steps():
            self.dataset_pass(replica, step)
        for group in replica.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, step)
        batch = self._prepare(next(replica.stream))
        with self.autocast():
            outputs = replica.algorithm.losses(batch, replica.forward_model, replica.teacher.module, step)
        if "loss" not in outputs:  # a plugin's contract, checked on the host: no device sync
            raise ValueError(f"algorithm '{replica.algorithm.name}': losses() returned {sorted(outputs)}, expected a "
                             "'loss' entry (the scalar tensor to minimise) beside any terms to log")
        loss = outputs["loss"]
        replica.optimizer.zero_grad(set_to_none=True)
        if replica.scaler is not None:
            replica.scaler.scale(loss).backward()
            replica.scaler.step(replica.optimizer)
            replica.scaler.update()
        else:
            loss.backward()
            replica.optimizer.step()
        replica.algorithm.after_optimizer_step(replica.model, step)
        # Without SyncBatchNorm each process's running statistics saw only its slice; with it they agree
        # already (then this only guards against the last bit). Either way the teacher copies the same.
        self.data_parallel.broadcast_(list(replica.model.buffers()), "BN buffer broadcast")
        replica.teacher.update(replica.model, step)
        every = replica.algorithm.unlabeled_pass_every()
        if every and (step + 1) % every == 0:
            self.unlabeled_pass(replica, step)
        return {key: value.detach() for key, value in outputs.items()}

    @torch.no_grad()
    def unlabeled_pass(self, replica: Replica, step: int) -> None:
        """The algorithm's model over the whole unlabeled set, its outputs to `after_unlabeled_pass`.

        Every process of a data-parallel group runs the whole pass: their models are identical copies,
        so each gets the same outputs with no communication (a pass is rare: once per epoch or generation).
        """
        algorithm = replica.algorithm
        model = replica.teacher.module if algorithm.unlabeled_pass_model == "teacher" else replica.model
        algorithm.after_unlabeled_pass(self.predict_unlabeled(model, replica.stream), step)

    def dataset_pass(self, replica: Replica, step: int) -> None:
        """The algorithm's model over the whole labeled and unlabeled sets, the outputs to `after_dataset_pass`.

        Every process of a data-parallel group runs the whole pass (as `unlabeled_pass`); then group rank 0's
        student, teacher and algorithm buffers are broadcast, so that whatever the hook computed (CoSSL trains
        a classifier there) is the same on every process even where the device's arithmetic is not.
        """
        algorithm, stream = replica.algorithm, replica.stream
        model = replica.teacher.module if algorithm.unlabeled_pass_model == "teacher" else replica.model
        outputs = DatasetPass(labeled=self.predict(model, stream.labeled_batches(self.cfg.eval_batch_size)),
                              labeled_targets=stream.labeled_classes_on_host(),
                              unlabeled=self.predict_unlabeled(model, stream))
        algorithm.after_dataset_pass(outputs, replica.model, replica.teacher.module, step)
        teacher = replica.teacher.module
        with torch.no_grad():
            self.data_parallel.broadcast_([*replica.model.parameters(), *replica.model.buffers(), *teacher.parameters(),
                                           *teacher.buffers(), *algorithm.buffers()], "dataset pass broadcast")

    @torch.no_grad()
    def predict_unlabeled(self, model: nn.Module, stream: Any) -> dict[str, torch.Tensor]:
        """`model`'s float32 outputs over every unlabeled image of `stream` (eval mode, unaugmented, in index
        order), the same on every process that holds the same model."""
        return self.predict(model, stream.unlabeled_batches(self.cfg.eval_batch_size))

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`model`'s float32 outputs over `batches` of images, concatenated, in eval mode under the run's autocast."""
        was_training = model.training
        model.eval()
        chunks = []
        for images in batches:
            with self.autocast():
                chunks.append(model(self._prepare({"x": images})["x"]))
        model.train(was_training)
        return {key: torch.cat([chunk[key].float() for chunk in chunks]) for key in chunks[0]}

    def images_per_step(self, replica: Replica) -> int:
        """Images this process forwards per step (labeled + every unlabeled view: its slice when D > 1)."""
        unlabeled = self.cfg.mu * self.cfg.batch_size if replica.algorithm.uses_unlabeled() else 0
        labeled = self.cfg.batch_size * (1 + replica.algorithm.num_labeled_strong_views())
        whole = labeled + unlabeled * (1 + replica.algorithm.num_strong_views())
        return whole // self.data_parallel.world_size
