"""Everything a run is built from, from a validated config: device, algorithm, models, replicas, evaluator, merge.

One place for this wiring, shared by main.py's path (ssl_imwa.run), the Python API and
`python -m ssl_imwa.evaluate` (ssl_imwa.evaluate rebuilds a saved run's models with it), and the
benchmarks (bench/, gpu_smoke included), so that what they measure is what a run trains.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ssl_imwa.algorithm import Algorithm, AlgorithmContext, get_algorithm
from ssl_imwa.config import Config, TrainConfig
from ssl_imwa.data import SSLData
from ssl_imwa.distributed import (
    Communicator,
    ProcessLayout,
    process_device,
    world_size_from_environment,
)
from ssl_imwa.ema import EMAConfig, EMATeacher
from ssl_imwa.evaluator import Evaluator, LogitOffset
from ssl_imwa.merge import MergeData, MergeStrategy, build_merge
from ssl_imwa.models import backbone_options, create_model
from ssl_imwa.models.batchnorm import synchronise_batchnorm
from ssl_imwa.trainer import Replica, Trainer, autocast_factory, build_optimizer


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every step.

    CPU PyTorch allocates each step's activations with malloc; glibc serves blocks above its mmap
    threshold with fresh mmaps, so every step pays page faults on tens of MB. Raising the
    threshold (to its 32 MB maximum) and the trim threshold makes steps 10-60% faster on this
    machine (docs/performance.md). No effect, and no error, off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 * 1024 * 1024), (m_trim_threshold, 16 * 1024 ** 3), (m_top_pad, 256 * 1024 ** 2)))


def configure_torch(cfg: Config) -> torch.device:
    """This process's device, made current before anything is allocated on it, and the backend flags.

    `deterministic` unset means deterministic on CPU (it costs nothing there) and fast on CUDA
    (cuDNN autotuning on, non-deterministic kernels allowed); `deterministic=true` on CUDA turns
    autotuning off and asks for deterministic kernels (warning where an op has none).
    """
    tune_glibc_malloc()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    visible_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = process_device(cfg.device, world_size_from_environment(), int(os.environ.get("LOCAL_RANK", "0")),
                            visible_gpus)
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type != "cuda"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic and device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif deterministic:
        # The public call also imports torch._inductor to set an option of torch.compile, which this project
        # does not use: 2-3 s at every process start. On the CPU the switch alone (the same flag).
        torch._C._set_deterministic_algorithms(True, warn_only=False)
    return device


def build_algorithm(cfg: Config, data: SSLData, device: torch.device, generation: int = 0,
                    dataset_labeled_counts: Sequence[int] | None = None) -> Algorithm:
    """The configured algorithm, told what it needs about the run (its AlgorithmContext): for a later
    generation, `data` holds its labeled set and `dataset_labeled_counts` the dataset's own counts."""
    context = AlgorithmContext(labeled_counts=tuple(data.counts["labeled"]), total_steps=cfg.train.iterations,
                               num_unlabeled=len(data.unlabeled_images), device=device, generation=generation,
                               dataset_labeled_counts=None if dataset_labeled_counts is None
                               else tuple(dataset_labeled_counts))
    return get_algorithm(cfg.algorithm.name)(cfg.algorithm, context)


@contextlib.contextmanager
def generation_rng(seed: int, generation: int, device: torch.device) -> Iterator[None]:
    """Where a generation's models are initialised: the run's RNG for generation 0 (so a run of one
    generation is what it always was); for a later one, a generator seeded by (seed, generation) alone,
    leaving the run's RNG untouched, so that a resume at any point rebuilds the same initial model."""
    if generation == 0:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(np.random.SeedSequence([seed, generation]).generate_state(1, np.uint64)[0]))
        yield


def build_initial_model(cfg: Config, data: SSLData, algorithm: Algorithm, device: torch.device) -> torch.nn.Module:
    """The configured backbone with the standard head plus every head the algorithm adds."""
    model = create_model(cfg.model.name, data.num_classes, data.in_channels, **backbone_options(cfg.model))
    for name, head in algorithm.build_heads(model.feature_dim, data.num_classes).items():
        model.add_head(name, head)
    return model.to(device)


def build_evaluator(cfg: Config, data: SSLData, head: str, device: torch.device,
                    logit_offset: LogitOffset | None = None) -> Evaluator:
    """Evaluation of `head` on the test split and, when the protocol holds one out, the validation split;
    `logit_offset`: the algorithm's `eval_logit_offset` (what is subtracted from `head`'s logits)."""
    # Resident on the device (uint8, a few hundred MB at most), so an evaluation copies nothing.
    splits = {"test": (data.test_images.to(device), data.test_targets)}
    if data.val_images is not None:
        splits["val"] = (data.val_images.to(device), data.val_targets)
    return Evaluator(splits, data.num_classes, data.counts["labeled"], data.mean, data.std, head,
                     cfg.train.eval_batch_size, device, cfg.train.channels_last,
                     autocast_factory(cfg.train.precision, device), logit_offset)


def data_parallel_wrapper(model: torch.nn.Module, data_parallel: Communicator, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the replica's group. BN buffers are not synchronised before each
    forward: the trainer broadcasts them after each step, so that the teachers copy the same ones."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # PyTorch 2.14 renamed broadcast_buffers (deprecated) to forward_sync_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_forward_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   process_group=data_parallel.group, **no_forward_sync)


def build_replica(index: int, cfg: Config, data: SSLData, algorithm: Algorithm, initial_model: torch.nn.Module,
                  device: torch.device, data_parallel: Communicator | None = None, generation: int = 0) -> Replica:
    """A replica starts from a copy of the shared initial model, with its own stream seeded by (seed, index)
    and, after the first generation, the generation (in the stream's `episode` slot: episodes share one stream).

    With a data-parallel group (D > 1) this process's copy trains on its slice of every batch: the
    stream is sharded, the model wrapped in DistributedDataParallel over the group (BN layers made
    group-wide first with model.sync_batchnorm), and the algorithm reduces its state over the group.
    """
    data_parallel = data_parallel or Communicator(device=device)
    model = copy.deepcopy(initial_model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mu = cfg.train.mu if algorithm.uses_unlabeled() else 0
    stream = data.make_stream(batch_size=cfg.train.batch_size, mu=mu, num_strong=algorithm.num_strong_views(),
                              seed=cfg.seed, replica=index, episode=generation, device=device,
                              num_labeled_strong=algorithm.num_labeled_strong_views(),
                              balanced=algorithm.balanced_labeled_batch(),
                              shard=(data_parallel.rank, data_parallel.world_size))
    return assemble_replica(index, model, stream, algorithm, ReplicaRecipe(cfg.train, cfg.algorithm.ema,
                                                                           cfg.model.sync_batchnorm),
                            device, data_parallel)


@dataclass(frozen=True)
class ReplicaRecipe:
    """The config a replica is assembled by: its training options, its EMA teacher's, and group-wide BN."""

    train: TrainConfig
    ema: EMAConfig
    sync_batchnorm: bool = False


def assemble_replica(index: int, model: torch.nn.Module, stream: Iterator, algorithm: Algorithm,
                     recipe: ReplicaRecipe, device: torch.device, data_parallel: Communicator | None = None
                     ) -> Replica:
    """A replica around a model already on `device` (in its memory format) and a batch stream: its EMA
    teacher, optimiser, fp16 gradient scaler and, for D > 1, its DistributedDataParallel wrapper."""
    data_parallel = data_parallel or Communicator(device=device)
    scaler = torch.amp.GradScaler(device.type) if recipe.train.precision == "fp16" else None
    teacher = EMATeacher(model, recipe.ema)   # plain BN: the teacher only evaluates and pseudo-labels
    wrapped = None
    if data_parallel.world_size > 1:
        if recipe.sync_batchnorm:
            model = synchronise_batchnorm(model, data_parallel.group, device.type)
        wrapped = data_parallel_wrapper(model, data_parallel, device)
        algorithm.batch_group = data_parallel
    return Replica(index=index, model=model, teacher=teacher, optimizer=build_optimizer(model, recipe.train),
                   algorithm=algorithm, stream=stream, scaler=scaler, wrapped=wrapped)


def build_replicas(cfg: Config, data: SSLData, device: torch.device, layout: ProcessLayout, generation: int = 0,
                   dataset_labeled_counts: Sequence[int] | None = None
                   ) -> tuple[list[Replica], torch.nn.Module, type[Algorithm]]:
    """This process's replicas of `generation`, all on `device`, and a copy of the shared initial model."""
    local = layout.across_replicas.local_replicas(cfg.imwa.k)
    with generation_rng(cfg.seed, generation, device):
        # Algorithm state is per replica: each local replica gets its own instance.
        algorithms = {k: build_algorithm(cfg, data, device, generation, dataset_labeled_counts) for k in local}
        initial_model = build_initial_model(cfg, data, algorithms[local[0]], device)
    replicas = [build_replica(k, cfg, data, algorithms[k], initial_model, device, layout.data_parallel, generation)
                for k in local]
    return replicas, initial_model, type(algorithms[local[0]])


@dataclass
class RunParts:
    """What the episode loop drives: this process's replicas, the trainer that steps them, the evaluator
    of their teachers, and the merge at each episode's end."""

    replicas: list[Replica]
    trainer: Trainer
    evaluator: Evaluator
    merger: MergeStrategy
    # (generation, (unlabeled indices, classes)) -> that generation's fresh replicas, trained on the
    # dataset's labeled set with those pseudo-labels added (runs whose algorithm chains generations).
    replicas_of_generation: Callable[[int, tuple[torch.Tensor, torch.Tensor]], list[Replica]] | None = None


def build_run_parts(cfg: Config, data: SSLData, device: torch.device, layout: ProcessLayout) -> RunParts:
    """This process's replicas, trainer, evaluator and merge strategy, as a run trains them. Evaluation and
    merges stay the first generation's: its labeled counts define the head/medium/tail groups."""
    replicas, initial_model, algorithm_cls = build_replicas(cfg, data, device, layout)

    def replicas_of_generation(generation: int, pseudo_labels: tuple[torch.Tensor, torch.Tensor]) -> list[Replica]:
        return build_replicas(cfg, data.with_pseudo_labels(*pseudo_labels), device, layout, generation,
                              data.counts["labeled"])[0]

    trainer = Trainer(cfg.train, device, layout.data_parallel)
    evaluator = build_evaluator(cfg, data, algorithm_cls.eval_head, device, algorithm_cls.eval_logit_offset)
    # Merges run among the processes of one data-parallel rank: every rank of a group merges at once.
    merger = build_merge(cfg.imwa, cfg.seed, layout.across_replicas,
                         lambda: MergeData(data, copy.deepcopy(initial_model), algorithm_cls.eval_head, device))
    return RunParts(replicas, trainer, evaluator, merger, replicas_of_generation)
