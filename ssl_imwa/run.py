"""A run from a config: validated (a resume's taken from its run directory), the run directory claimed,
data and replicas built (ssl_imwa.builders), the episode loop run, and how it ended recorded."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssl_imwa.builders import RunParts, build_run_parts, configure_torch
from ssl_imwa.checkpoint_store import CheckpointStore, fingerprint
from ssl_imwa.cluster import continues_a_requeued_job
from ssl_imwa.config import Config, generation_count, validate
from ssl_imwa.data import SSLData, build_data
from ssl_imwa.distributed import (
    Communicator,
    ProcessLayout,
    init_process_layout,
    rank_from_environment,
)
from ssl_imwa.history import RunHistory
from ssl_imwa.imwa import Orchestrator
from ssl_imwa.resume import launch_choices, resumed_config
from ssl_imwa.rng import seed_everything
from ssl_imwa.run_logger import RunLogger, Tracker, trial_name
from ssl_imwa.rundir import (
    LOCK_NAME,
    RunDirectoryLock,
    refuse_a_used_directory,
    used_by_a_run,
)
from ssl_imwa.stopping import StopRequests, Terminated
from ssl_imwa.trackers import open_trackers

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
    logger.propagate = False   # a Slurm task's Hydra logs to the job's main.log: process 0's alone
    # Hydra's `job_logging=disabled` (main.py gives it to these processes) disables every logger that
    # exists when it is applied, and main.py's checks before Hydra have created ours by then.
    for name, existing in logging.Logger.manager.loggerDict.items():
        if (name == "ssl_imwa" or name.startswith("ssl_imwa.")) and isinstance(existing, logging.Logger):
            existing.disabled = False
    logger.addHandler(to_file)
    logger.addHandler(to_console)


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
    if continues_a_requeued_job(run_dir, bool(cfg.get("resume", False))):
        cfg.resume = True
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
    data, parts = _build(cfg, run_dir, device, layout)
    logger = RunLogger(run_dir, data.class_names, "tensorboard" in cfg.logger, _trackers(cfg, run_dir, comm),
                       queue_for_trackers=not comm.is_main and _uses_trackers(cfg))
    store = CheckpointStore(run_dir, fingerprint(cfg), layout.across_replicas, layout.data_parallel)
    stop = StopRequests()
    orchestrator = Orchestrator(cfg, parts, RunHistory(logger, cfg.imwa.k, store.is_main, data.counts), store, stop)
    if cfg.resume:
        orchestrator.resume()
    if comm.is_main:  # after a resume has been accepted: a refused one leaves the run's record as it was
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    generations = generation_count(cfg)
    length = (f"{generations} generations of {cfg.train.iterations} steps" if generations > 1
              else f"{cfg.train.iterations} steps")
    log.info("run dir %s | %s %s on %s (%s) | preset experiment=%s | k=%d episodes=%d | %s per replica | "
             "device %s, %d process(es) (%d per replica)", run_dir, "resuming" if cfg.resume else "starting",
             cfg.algorithm.name, cfg.dataset.name, cfg.model.name, preset, cfg.imwa.k, cfg.imwa.episodes,
             length, device, comm.world_size, layout.data_parallel.world_size)
    results = _run_to_the_end(orchestrator, stop, comm, cfg)
    if results is None:
        if comm.is_main:
            log.info("stopped at train.stop_at=%d with a checkpoint there; continue with: python main.py resume=true "
                     "hydra.run.dir=%s", cfg.train.stop_at, run_dir)
    else:
        orchestrator.logger.status("complete")
        log.info("final test top1 %.4f, balanced %.4f (%.1f s, %.0f images/s)", results["final"]["top1"],
                 results["final"]["balanced_acc"], results["wall_time_s"], results["images_per_s"])
    return results


def _build(cfg: Config, run_dir: Path, device: torch.device, layout: ProcessLayout) -> tuple[SSLData, RunParts]:
    """The data and what the episode loop drives; a failed start (missing data, ...) is recorded for the
    report too, unless it was a resume (which leaves the run's record as it was)."""
    comm = layout.world
    try:
        data = build_data(cfg.dataset)
        return data, build_run_parts(cfg, data, device, layout)
    except BaseException as error:
        if comm.is_main and not cfg.resume:
            RunLogger(run_dir, []).status("failed", error=f"{type(error).__name__}: {error}")
        comm.close()
        raise


def _run_to_the_end(orchestrator: Orchestrator, stop: StopRequests, comm: Communicator, cfg: Config
                    ) -> dict[str, Any] | None:
    """Train, then write results.json and the hyperparameters (process 0); however the run ends, its
    status is recorded and the logger closed."""
    logger = orchestrator.logger
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
            record_a_lost_main_process(logger, logger.run_dir, comm.rank, error)
        logger.close(ending_a_failure=True)
        comm.close()
        raise
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


def _trackers(cfg: Config, run_dir: Path, comm: Communicator) -> list[Tracker]:
    """The experiment trackers besides TensorBoard, opened by process 0 under the TensorBoard run's name."""
    if not comm.is_main or not _uses_trackers(cfg):
        return []
    from ssl_imwa.report.runs import flatten

    return open_trackers(list(cfg.logger), run_dir, trial_name(run_dir),
                         flatten(OmegaConf.to_container(cfg, resolve=True)))


def _uses_trackers(cfg: Config) -> bool:
    return any(name != "tensorboard" for name in cfg.logger)


def _hparams(cfg: Config) -> dict[str, Any]:
    return {"algorithm": cfg.algorithm.name, "dataset": cfg.dataset.name, "model": cfg.model.name,
            "seed": cfg.seed, "imwa.k": cfg.imwa.k, "imwa.episodes": cfg.imwa.episodes,
            "imwa.merge": cfg.imwa.merge, "train.iterations": cfg.train.iterations, "train.lr": cfg.train.lr,
            "train.mu": cfg.train.mu, "dataset.imbalance": cfg.dataset.imbalance,
            "dataset.unlabeled": cfg.dataset.unlabeled}
