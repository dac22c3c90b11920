"""Build data, algorithm and replicas from a validated config, then hand them to the orchestrator."""
from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssl_imwa.algorithm import Algorithm, AlgorithmContext, get_algorithm
from ssl_imwa.config import Config, validate
from ssl_imwa.data import SSLData, build_data
from ssl_imwa.distributed import (
    Communicator,
    ProcessLayout,
    init_process_layout,
    process_device,
    rank_from_environment,
    world_size_from_environment,
)
from ssl_imwa.ema import EMATeacher
from ssl_imwa.evaluator import Evaluator
from ssl_imwa.imwa import Orchestrator
from ssl_imwa.keys import LAUNCH_KEYS
from ssl_imwa.merge import MergeContext, create_merge
from ssl_imwa.models import create_model
from ssl_imwa.models.batchnorm import synchronise_batchnorm
from ssl_imwa.resume import launch_choices, resumed_config
from ssl_imwa.rng import seed_everything
from ssl_imwa.run_logger import RunLogger
from ssl_imwa.rundir import (
    LOCK_NAME,
    RunDirectoryLock,
    refuse_a_used_directory,
    used_by_a_run,
)
from ssl_imwa.stopping import StopRequests, Terminated
from ssl_imwa.trainer import Replica, Trainer, autocast_factory, build_optimizer

log = logging.getLogger("ssl_imwa")
# Where Hydra's record of a launch goes (Hydra's default hydra.output_subdir; ssl_imwa.resume reads it there).
HYDRA_RECORD = ".hydra"


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file and a rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """Flattened config minus the keys a resume may change; a checkpoint must match it."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {key: value for key, value in flat.items() if key not in LAUNCH_KEYS}


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


def build_initial_model(cfg: Config, data: SSLData, algorithm: Algorithm, device: torch.device) -> torch.nn.Module:
    """The configured backbone with the standard head plus every head the algorithm adds."""
    model = create_model(cfg.model.name, data.num_classes, data.in_channels, cfg.model.bn_momentum)
    for name, head in algorithm.build_heads(model.feature_dim, data.num_classes).items():
        model.add_head(name, head)
    return model.to(device)


def build_evaluator(cfg: Config, data: SSLData, head: str, device: torch.device) -> Evaluator:
    """Evaluation of `head` on the test split and, when the protocol holds one out, the validation split."""
    # Resident on the device (uint8, a few hundred MB at most), so an evaluation copies nothing.
    splits = {"test": (data.test_images.to(device), data.test_targets)}
    if data.val_images is not None:
        splits["val"] = (data.val_images.to(device), data.val_targets)
    return Evaluator(splits, data.num_classes, data.counts["labeled"], data.mean, data.std, head,
                     cfg.train.eval_batch_size, device, cfg.train.channels_last,
                     autocast_factory(cfg.train.precision, device))


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
                  device: torch.device, data_parallel: Communicator | None = None) -> Replica:
    """A replica starts from a copy of the shared initial model, with its own stream seeded by (seed, index).

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
                              seed=cfg.seed, replica=index, episode=0, device=device,
                              shard=(data_parallel.rank, data_parallel.world_size))
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    teacher = EMATeacher(model, cfg.algorithm.ema)   # plain BN: the teacher only evaluates and pseudo-labels
    wrapped = None
    if data_parallel.world_size > 1:
        if cfg.model.sync_batchnorm:
            model = synchronise_batchnorm(model, data_parallel.group, device.type)
        wrapped = data_parallel_wrapper(model, data_parallel, device)
        algorithm.batch_group = data_parallel
    return Replica(index=index, model=model, teacher=teacher, optimizer=build_optimizer(model, cfg.train),
                   algorithm=algorithm, stream=stream, scaler=scaler, wrapped=wrapped)


def agree_on_run_dir(run_dir: Path, comm: Communicator) -> Path:
    """Process 0's run directory, for every process.

    Each process resolves `outputs/${now:...}` by its own clock, so a launch skewed across a second
    boundary would split one run over two directories. Another process's own directory, empty
    because main.py tells Hydra to write nothing there, is removed.
    """
    shared = Path(comm.broadcast_object(str(run_dir), "run directory broadcast"))
    if shared != run_dir and run_dir.is_dir():
        try:
            run_dir.rmdir()
        except OSError:  # not empty: not ours to remove
            pass
    return shared


def log_secondary_process(run_dir: Path, rank: int) -> None:
    """Processes other than 0 log to `run_dir/rank<r>.log`; only their warnings reach the console."""
    to_file = logging.FileHandler(run_dir / f"rank{rank}.log")
    to_file.setFormatter(logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter(f"[rank {rank}][%(levelname)s] %(message)s"))
    logger = logging.getLogger("ssl_imwa")  # ssl_imwa.data and the algorithms' loggers are its children
    logger.setLevel(logging.INFO)
    # Hydra's `job_logging=disabled` (main.py gives it to these processes) disables every logger that
    # exists when it is applied, and main.py's checks before Hydra have created ours by then.
    for name, existing in logging.Logger.manager.loggerDict.items():
        if (name == "ssl_imwa" or name.startswith("ssl_imwa.")) and isinstance(existing, logging.Logger):
            existing.disabled = False
    logger.addHandler(to_file)
    logger.addHandler(to_console)


def build_algorithm(cfg: Config, data: SSLData, device: torch.device) -> Algorithm:
    """The configured algorithm, told what it needs about the run (its AlgorithmContext)."""
    context = AlgorithmContext(labeled_counts=tuple(data.counts["labeled"]), total_steps=cfg.train.iterations,
                               num_unlabeled=len(data.unlabeled_images), device=device)
    return get_algorithm(cfg.algorithm.name)(cfg.algorithm, context)


def build_replicas(cfg: Config, data: SSLData, device: torch.device, layout: ProcessLayout
                   ) -> tuple[list[Replica], torch.nn.Module, type[Algorithm]]:
    """This process's replicas, all on `device`, and a copy of the shared initial model."""
    local = layout.across_replicas.local_replicas(cfg.imwa.k)
    # Algorithm state is per replica: each local replica gets its own instance.
    algorithms = {k: build_algorithm(cfg, data, device) for k in local}
    initial_model = build_initial_model(cfg, data, algorithms[local[0]], device)
    replicas = [build_replica(k, cfg, data, algorithms[k], initial_model, device, layout.data_parallel)
                for k in local]
    return replicas, initial_model, type(algorithms[local[0]])


def run(cfg: DictConfig, command_line: Sequence[str] = (), hydra_record: dict[str, str] | None = None
        ) -> dict[str, Any] | None:
    """Train according to `cfg`; returns the results dict (None when stopped by train.stop_at).

    `command_line`: the overrides typed for this launch; a resume takes the run's own saved
    config and only these (ssl_imwa.resume). `hydra_record`: Hydra's record of the launch (file
    name to text), which main.py keeps Hydra from writing: written into `.hydra/` once a fresh
    launch is accepted, so that a refused launch (or any resume) leaves the run's record as it was.
    """
    if cfg.get("run_dir") is None:
        raise ValueError("run_dir is not set: main.py takes it from Hydra's output directory (hydra.run.dir); "
                         "a run started from Python needs run_dir=<path>")
    run_dir = Path(cfg.run_dir)
    if cfg.get("resume", False):
        cfg = resumed_config(cfg, command_line)
    try:
        cfg = validate(cfg)
    except Exception as error:  # recorded so a sweep's report can say why this job produced nothing
        # ...but a refused resume leaves the run it was asked to continue as it was.
        # ...and so does a fresh launch into a directory that holds a run (or one that runs now).
        if rank_from_environment() == 0 and not cfg.get("resume", False) and used_by_a_run(run_dir) is None \
                and not (run_dir / LOCK_NAME).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            RunLogger(run_dir, []).status("failed", error=f"{type(error).__name__}: {error}")
        raise
    device = configure_torch(cfg)
    layout = init_process_layout(device, cfg.imwa.timeout_s, cfg.imwa.data_parallel)
    run_dir = agree_on_run_dir(run_dir, layout.world)
    cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = claim_run_dir(run_dir, cfg.resume, layout.world)
    try:
        if hydra_record and not cfg.resume and layout.world.is_main:  # accepted: now the record may be written
            for name, text in hydra_record.items():
                write_text_atomic(run_dir / HYDRA_RECORD / name, text)
        return _train(cfg, run_dir, device, layout, launch_preset(run_dir, command_line, cfg.resume))
    finally:
        lock.release()


def claim_run_dir(run_dir: Path, resume: bool, comm: Communicator) -> RunDirectoryLock:
    """Process 0 locks the run directory (and, for a fresh run, checks that no run trained there);
    every process gets its verdict, so all stop together when it is refused."""
    lock = RunDirectoryLock(run_dir)
    problem = None
    if comm.is_main:
        try:
            if not resume:
                refuse_a_used_directory(run_dir)
            lock.acquire()
        except FileExistsError as error:
            problem = str(error)
    problem = comm.broadcast_object(problem, "run directory claim")
    if problem:
        comm.close()
        raise FileExistsError(problem)
    return lock


def launch_preset(run_dir: Path, command_line: Sequence[str], resume: bool) -> str:
    """The run's experiment preset, for the start line: Hydra's record of its first launch, else (a run
    started from Python has no record) the `experiment=` typed for this launch."""
    typed = [override.split("=", 1)[1] for override in command_line
             if override.lstrip("+").split("=", 1)[0] == "experiment" and "=" in override]
    for choice in (launch_choices(run_dir).get("experiment"), typed[-1] if typed else None):
        if choice not in (None, "", "None", "null"):
            return choice
    # a resume of a run started from Python, with no experiment= typed: nothing says which it was
    return "not recorded" if resume and not (run_dir / ".hydra").is_dir() else "none"


def _train(cfg: Config, run_dir: Path, device: torch.device, layout: ProcessLayout,
           preset: str = "none") -> dict[str, Any] | None:
    comm = layout.world
    if not comm.is_main:
        log_secondary_process(run_dir, comm.rank)
    seed_everything(cfg.seed)
    try:
        data = build_data(cfg.dataset)
        replicas, initial_model, algorithm_cls = build_replicas(cfg, data, device, layout)
    except BaseException as error:  # a failed start (missing data, ...) is recorded for the report too
        if comm.is_main and not cfg.resume:
            RunLogger(run_dir, []).status("failed", error=f"{type(error).__name__}: {error}")
        comm.close()
        raise
    trainer = Trainer(cfg.train, device, layout.data_parallel)
    evaluator = build_evaluator(cfg, data, algorithm_cls.eval_head, device)
    logger = RunLogger(run_dir, data.class_names)
    # Merges run among the processes of one data-parallel rank: every rank of a group merges at once.
    merger = create_merge(cfg.imwa.merge, MergeContext(cfg, replicas[0].algorithm.merge_states, algorithm_cls.eval_head,
                                                       layout.across_replicas, data, copy.deepcopy(initial_model),
                                                       device))
    stop = StopRequests()
    orchestrator = Orchestrator(cfg, replicas, trainer, evaluator, logger, fingerprint(cfg), data.counts, merger,
                                layout.across_replicas, stop, layout.data_parallel)
    if cfg.resume:
        orchestrator.resume()
    if comm.is_main:  # after a resume has been accepted: a refused one leaves the run's record as it was
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run dir %s | %s %s on %s (%s) | preset experiment=%s | k=%d episodes=%d | %d steps per replica | "
             "device %s, %d process(es) (%d per replica)", run_dir, "resuming" if cfg.resume else "starting",
             cfg.algorithm.name, cfg.dataset.name, cfg.model.name, preset, cfg.imwa.k, cfg.imwa.episodes,
             cfg.train.iterations, device, comm.world_size, layout.data_parallel.world_size)
    try:
        with stop:
            results = orchestrator.run()
        comm.close()
        if results is not None:   # other processes than 0 return None at the end of every run
            logger.results(results)
            logger.hparams(_hparams(cfg), {"final_top1": results["final"]["top1"],
                                           "final_balanced_acc": results["final"]["balanced_acc"]})
        logger.close()   # every event written before the run is called complete
    except BaseException as error:
        if comm.is_main:
            # A stop that was asked for (Ctrl-C, a scheduler's SIGTERM, torchrun's teardown) is 'stopped'
            # even when it surfaces as another process's broken connection: resume=true continues it.
            state = "stopped" if isinstance(error, Terminated) or stop.signal_name else "failed"
            logger.status(state, error=f"{type(error).__name__}: {error}")
        else:
            record_a_lost_main_process(logger, run_dir, comm.rank, error)
        logger.close(ending_a_failure=True)
        comm.close()
        raise
    if results is None:
        if comm.is_main:
            log.info("stopped at train.stop_at=%d with a checkpoint there; continue with: python main.py resume=true "
                     "hydra.run.dir=%s", cfg.train.stop_at, run_dir)
    else:
        logger.status("complete")
        log.info("final test top1 %.4f, balanced %.4f (%.1f s, %.0f images/s)", results["final"]["top1"],
                 results["final"]["balanced_acc"], results["wall_time_s"], results["images_per_s"])
    return results


def record_a_lost_main_process(logger: RunLogger, run_dir: Path, rank: int, error: BaseException,
                               wait_s: float = 3.0) -> None:
    """Process 0 records how a run ends. When it died without a word (SIGKILL, the OOM killer), its
    lock on the run directory is free while status.json still says `running`: a process that
    outlives it records `failed`, naming it, so the run is never left `running` for ever. The lock
    of a process that has just died may take a moment to be freed: asked again for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while (owner := RunDirectoryLock(run_dir).holder_died()) is None:
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    try:
        if json.loads(logger.status_path.read_text()).get("status") != "running":
            return
    except (OSError, ValueError):
        return
    logger.status("failed", error=f"process 0 (pid {owner['pid']} on {owner['host']}) died without recording why; "
                                   f"process {rank} then stopped: {type(error).__name__}: {error}")


def _hparams(cfg: Config) -> dict[str, Any]:
    return {"algorithm": cfg.algorithm.name, "dataset": cfg.dataset.name, "model": cfg.model.name,
            "seed": cfg.seed, "imwa.k": cfg.imwa.k, "imwa.episodes": cfg.imwa.episodes,
            "imwa.merge": cfg.imwa.merge, "train.iterations": cfg.train.iterations, "train.lr": cfg.train.lr,
            "train.mu": cfg.train.mu, "dataset.imbalance": cfg.dataset.imbalance,
            "dataset.unlabeled": cfg.dataset.unlabeled}
