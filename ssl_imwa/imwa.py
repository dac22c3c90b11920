"""The IMWA orchestrator: K resident replicas, E episodes on the global step, a merge after each.

K=1, E=1 is a plain run; E=1 is vanilla MWA. Replicas keep their own data streams across
episodes, so replica k's data in episode e is fixed by (seed, k, e) and K=1 with any E is
bitwise the plain run (merging one replica is the identity). With W processes in G = W / D
replica groups, this process holds replicas k with k mod G == its group; process 0 evaluates
the merged model and writes the run's files. Of the D data-parallel processes of a group, all
train and merge, and data-parallel rank 0 alone evaluates, logs and checkpoints (the D copies
of a replica are identical after every step: ssl_imwa.trainer).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ssl_imwa.checkpoint import (
    FORMAT_VERSION,
    CorruptCheckpoint,
    link_atomic,
    load_checkpoint,
    save_atomic,
)
from ssl_imwa.config import Config
from ssl_imwa.distributed import Communicator, to_device
from ssl_imwa.evaluator import Evaluator
from ssl_imwa.keys import SUMMARY_METRICS
from ssl_imwa.merge import MergeResult, MergeStrategy
from ssl_imwa.metrics import median_of_last
from ssl_imwa.rng import rng_state, set_rng_state
from ssl_imwa.run_logger import RunLogger, metrics_line
from ssl_imwa.stopping import StopRequests, Terminated
from ssl_imwa.trainer import Replica, Trainer, lr_at

log = logging.getLogger("ssl_imwa")
# Teacher top-1 this far (absolute) below its student's at the first evaluation: worth a warning.
TEACHER_LAG_WARNING = 0.15


def host_scalars(outputs: dict[str, torch.Tensor], data_parallel: Communicator | None = None) -> dict[str, float]:
    """A step's logged values as Python floats in one device-to-host transfer (float64: exact).

    With data parallelism each process computed them on its slice: the mean over the group's
    slices, leaving out a slice's NaN (a pseudo-label accuracy with no known label in it).
    """
    values = torch.stack([value.detach().reshape(()).double() for value in outputs.values()])
    if data_parallel is not None and data_parallel.world_size > 1:
        valid = ~values.isnan()
        totals = data_parallel.sum(torch.stack([torch.where(valid, values, 0.0), valid.double()]))
        values = totals[0] / totals[1]
    return dict(zip(outputs, values.tolist()))


class Orchestrator:
    """Owns replicas, episodes, merges, evaluation bookkeeping and run-level checkpoints."""

    def __init__(self, cfg: Config, replicas: list[Replica], trainer: Trainer, evaluator: Evaluator,
                 logger: RunLogger, fingerprint: dict[str, Any], split_counts: dict[str, list[int]],
                 merger: MergeStrategy, comm: Communicator, stop: StopRequests | None = None,
                 data_parallel: Communicator | None = None) -> None:
        self.cfg = cfg
        # comm: the processes holding the other replicas (one per replica group, this data-parallel rank);
        # data_parallel: the processes sharing this process's replicas. Its rank 0 leads: it alone evaluates,
        # logs and checkpoints; the run's files are written by the leader of group 0.
        self.data_parallel = data_parallel or Communicator()
        self.leads = self.data_parallel.rank == 0
        self.is_main = comm.is_main and self.leads
        self.stop = stop or StopRequests()
        self.watch_teacher = not cfg.algorithm.ema.warmup
        self.steps_at_launch, self.launch_clock = 0, time.perf_counter()  # for the ETA
        self.replicas = replicas
        self.k = cfg.imwa.k
        self.trainer = trainer
        self.evaluator = evaluator
        self.logger = logger
        self.fingerprint = fingerprint
        self.split_counts = split_counts
        self.merger = merger
        self.comm = comm
        self.checkpoint_dir = Path(cfg.run_dir) / "checkpoints"
        self.steps_per_episode = cfg.train.iterations // cfg.imwa.episodes
        self.episode = 0
        self.replica_steps = {replica.index: 0 for replica in replicas}
        # The episode's common start point, which TWA may use as a candidate; checkpointed when it
        # does, since after a resume mid-episode no replica holds it any more.
        self.episode_start: dict[str, Any] | None = None
        self.keeps_start = merger.needs_episode_start
        # Per replica, on the device: the first step whose loss was not finite (-1: none yet).
        self.first_nonfinite: dict[int, torch.Tensor] = {}
        # Evaluations of this process's replicas not yet handed to process 0 (W > 1 only).
        self.pending: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {
            "evaluations": [], "merges": [], "train_seconds": 0.0, "images": 0, "metrics_lines": 0, "best": None,
            # Intra-op CPU threads of each launch (one entry per resume that changed it): on the CPU the
            # thread count splits reductions differently, so it is part of what makes a run repeatable.
            "cpu_threads": [torch.get_num_threads()],
        }
        self._clock = time.perf_counter()

    # ----- bookkeeping -------------------------------------------------------------------
    def _elapsed(self) -> float:
        now = time.perf_counter()
        self.state["train_seconds"] += now - self._clock
        self._clock = now
        return self.state["train_seconds"]

    def _keep(self, record: dict[str, Any]) -> None:
        """Process 0 appends to metrics.jsonl and the run's history; others queue it for the next merge."""
        if not self.is_main:
            self.pending.append(record)
            return
        self.logger.append_metrics(record)
        self.state["metrics_lines"] += 1
        self.state["evaluations"].append(record)

    def _collect_pending(self) -> None:
        for chunk in self.comm.all_gather_object(self.pending, "evaluation gather")[1:]:
            if self.is_main:
                for record in chunk:
                    self._keep(record)
        self.pending = []

    def _representative(self, source: str, replica: int | None) -> bool:
        """The evaluations that describe the run's output model: replica 0 when K=1, merges otherwise."""
        return source == "merged" if self.k > 1 else (source == "replica" and replica == 0)

    def _evaluate(self, module: torch.nn.Module, source: str, replica: int | None, step: int) -> dict[str, Any]:
        results = {}
        for split in ("test", "val") if "val" in self.evaluator.splits else ("test",):
            metrics = self.evaluator.evaluate(module, split)
            record = {"step": step, "source": source, "replica": replica, "episode": self.episode + 1,
                      "split": split, **{key: metrics[key] for key in (*SUMMARY_METRICS, "per_class")},
                      "time_s": self._elapsed()}
            self.logger.evaluation_scalars(record, metrics["confusion"])
            self._keep(record)
            results[split] = metrics
        if "val" in results and self._representative(source, replica):
            best = self.state["best"]
            if best is None or results["val"]["top1"] > best["val_top1"]:
                test = results["test"]
                self.state["best"] = {"step": step, "val_top1": results["val"]["top1"],
                                      **{key: test[key] for key in (*SUMMARY_METRICS, "per_class")}}
                self._save("best.pt")
        if self.is_main:
            self.logger.status("running")
        return results["test"]

    def _checkpoint_name(self, name: str) -> str:
        """One file per process when replicas are spread over processes."""
        if self.comm.world_size == 1:
            return name
        stem, suffix = name.rsplit(".", 1)
        return f"{stem}.rank{self.comm.rank}.{suffix}"

    def _watch_loss(self, replica: Replica, loss: torch.Tensor, done: int) -> None:
        """Remember on the device the first step whose loss was not finite; read back only by the checks."""
        first = self.first_nonfinite.get(replica.index)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_nonfinite[replica.index] = torch.where(first.lt(0) & ~torch.isfinite(loss.detach()), done, first)

    def _ensure_finite(self, replicas: list[Replica]) -> None:
        """Stop before anything computed from a non-finite step is logged, evaluated, merged or saved,
        naming the first bad step: the last good checkpoint stays the newest."""
        for replica in replicas:
            where = f"replica {replica.index}, episode {self.episode + 1}"
            first = self.first_nonfinite.get(replica.index)
            if first is not None and int(first) >= 0:
                raise FloatingPointError(
                    f"{where}: the loss is not finite at step {int(first)} (noticed at step "
                    f"{self.replica_steps[replica.index]}); stopped, nothing after the last good checkpoint was written")
            tensors = [tensor for module in (replica.model, replica.teacher.module)
                       for tensor in module.state_dict().values() if tensor.is_floating_point()]
            if not bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
                raise FloatingPointError(
                    f"{where}: weights are not finite after step {self.replica_steps[replica.index]}; stopped, "
                    "nothing after the last good checkpoint was written")

    def _save(self, name: str) -> Path | None:
        """Write a checkpoint of this process's replicas (by the group's leader; None elsewhere)."""
        self._ensure_finite(self.replicas)
        if not self.leads:
            return None
        self._elapsed()
        payload = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "progress": {"episode": self.episode, "replica_steps": dict(self.replica_steps)},
            "replicas": [replica.state_dict() for replica in self.replicas],
            "run_state": {**self.state, "pending": self.pending, "rng": rng_state(self.trainer.device)},
            "episode_start": self.episode_start if self.keeps_start else None,
        }
        path = self.checkpoint_dir / self._checkpoint_name(name)
        save_atomic(payload, path)
        return path

    def resume(self) -> None:
        """Restore every replica, the episode cursor and the run's history from the newest common state.

        One process: its latest checkpoint. W processes: each may have been stopped at a different
        point, so they agree first. Ranks whose latest checkpoints lie in the same episode continue
        from them (they train independently until the next merge); a rank that is already past a
        merge the others have not reached goes back to its checkpoint of the last merge they all
        passed (`merge_NNN`), or to the start if that is merge 0. Training is deterministic, so the
        steps done twice come out the same.
        """
        if self.leads:
            self._remove_stale_temporaries()
        latest = self.checkpoint_dir / self._checkpoint_name("latest.pt")
        writers = self._processes_that_wrote()
        if writers is not None and writers != self.comm.world_size:
            dp = self.data_parallel.world_size   # the run's own: imwa.data_parallel cannot change at a resume
            processes = writers * dp
            how = (f"torchrun --nproc_per_node={processes} main.py ... (or {processes} processes over the nodes)"
                   if processes > 1 else "python main.py ... (no torchrun)")
            raise ValueError(f"run {self.checkpoint_dir.parent} was written by {processes} process(es) "
                             f"({writers} replica group(s) of imwa.data_parallel={dp}), this resume has "
                             f"{self.comm.world_size * dp}: every group holds its own replicas, so resume with {how}")
        if self.comm.world_size == 1:
            payload, source = self._newest_intact()
            if payload is None:
                self._start_again_or_refuse(latest)
                return
            self._restore(payload, source)
            return
        payload, problem, newest = None, None, latest
        try:
            payload, newest = self._newest_intact()
        except (OSError, RuntimeError) as error:  # reported by every process below: none waits for the others
            problem = f"{type(error).__name__}: {error}"
        if payload is None and problem is None and self.is_main:
            problem = self._lost_history(newest)
        episode = None if payload is None else payload["progress"]["episode"]
        everyone = self.comm.all_gather_object({"episode": episode, "problem": problem}, "resume agreement")
        self._raise_if_any([entry["problem"] for entry in everyone])
        if all(entry["episode"] is None for entry in everyone):
            self._start_again_or_refuse(self.checkpoint_dir / "latest.rank<r>.pt")
            return
        common = min(entry["episode"] or 0 for entry in everyone)
        source: Path | None = newest
        if episode is None or episode > common:
            payload, problem = None, None
            source = self.checkpoint_dir / self._checkpoint_name(f"merge_{common:03d}.pt") if common else None
            if source is not None:
                try:
                    payload = load_checkpoint(source, self.fingerprint)
                except (OSError, RuntimeError) as error:
                    problem = (f"its latest checkpoint is in episode {(episode or 0) + 1}, past the others' episode "
                               f"{common + 1}, and going back needs {source}: {type(error).__name__}: {error}")
        self._raise_if_any(self.comm.all_gather_object(problem, "resume agreement"))
        if episode is not None and episode > common:
            log.warning("process %d: latest checkpoint is past merge %d, which not every process has reached: "
                        "resuming from %s", self.comm.rank, common, source or "the start")
        if payload is None:
            if self.is_main:
                self._rewrite_metrics()
            log.info("process %d restarts from the beginning (no checkpoint before merge %d)", self.comm.rank,
                     common + 1)
            return
        self._restore(payload, source)

    def _start_again_or_refuse(self, latest: Path) -> None:
        """No checkpoint at all. A run that started here (its config.yaml is written before the first
        step) was stopped before its first checkpoint: nothing is lost by starting it again, and
        training is deterministic, so that is the resume. Anywhere else there is nothing to resume,
        and a run that went past its first checkpoint (its checkpoints were deleted or lost) is not
        trained again over its record."""
        if not (self.checkpoint_dir.parent / "config.yaml").is_file():
            raise FileNotFoundError(f"checkpoint {latest} does not exist: nothing to resume (run without "
                                    "resume=true)")
        lost = self._lost_history(latest) if self.is_main else None
        if lost:
            raise FileNotFoundError(lost)
        log.warning("%s was stopped before its first checkpoint: starting it again from step 0",
                    self.checkpoint_dir.parent)
        if self.is_main:
            self._rewrite_metrics()

    def _lost_history(self, latest: Path) -> str | None:
        """Why this run, which has no checkpoint, must not start again from step 0 (None: it may).

        Its results.json says it finished; an evaluation in metrics.jsonl after the first step at which
        a checkpoint is written says it had one. Either way its checkpoints were deleted or lost.
        """
        run_dir = self.checkpoint_dir.parent
        where = f"{self.checkpoint_dir} holds no checkpoint ({latest.name} does not exist)"
        advice = ("resume=true cannot continue it and does not train it again over its record: restore its "
                  "checkpoints, or start a new run in another directory")
        if (run_dir / "results.json").exists():
            return f"{where}, but the run finished ({run_dir / 'results.json'} is there): {advice}"
        train = self.cfg.train
        first = min(train.checkpoint_every or train.eval_every, self.steps_per_episode)
        steps = []
        try:
            for line in self.logger.metrics_path.read_text().splitlines():
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):   # a torn or foreign line proves nothing
                    continue
        except (OSError, ValueError):   # no file, or not text
            return None
        if steps and max(steps) > first:
            return (f"{where}, but {self.logger.metrics_path} holds evaluations up to step {max(steps)}, past "
                    f"the first checkpoint at step {first}: {advice}")
        return None

    def _newest_intact(self) -> tuple[dict[str, Any] | None, Path]:
        """This process's latest checkpoint or, when that is missing or unreadable, its newest readable
        merge checkpoint: a consistent state, from which the steps after it are trained again
        (deterministically). None when there is no checkpoint at all; raises when checkpoints exist
        but none can be read, or when one belongs to another experiment (never a silent fresh start)."""
        latest = self.checkpoint_dir / self._checkpoint_name("latest.pt")
        merges = [path for path in self.checkpoint_dir.glob(self._checkpoint_name("merge_*.pt"))
                  if self.comm.world_size > 1 or ".rank" not in path.name]
        damaged: list[str] = []
        for path in [latest, *sorted(merges, key=lambda path: path.name, reverse=True)]:
            if not path.exists():
                continue
            try:
                payload = load_checkpoint(path, self.fingerprint)
            except CorruptCheckpoint as error:
                damaged.append(str(error))
                continue
            if path != latest:
                log.warning("%s; resuming from %s, the newest intact checkpoint (the steps after it are trained "
                            "again)", "; ".join(damaged) or f"{latest} is missing", path)
            return payload, path
        if damaged:
            raise CorruptCheckpoint("; ".join(damaged) + "; no intact checkpoint is left to resume from")
        return None, latest

    def _remove_stale_temporaries(self) -> None:
        """Half-written checkpoints of this process left by a kill during a write (never read: the
        rename that publishes a checkpoint did not happen)."""
        mine = self._checkpoint_name("*.pt")
        for path in self.checkpoint_dir.glob(f"{mine}.*.tmp"):
            if self.comm.world_size > 1 or ".rank" not in path.name:
                path.unlink(missing_ok=True)
                log.info("removed %s, a checkpoint whose write was interrupted", path)

    def _processes_that_wrote(self) -> int | None:
        """How many processes wrote this run's latest checkpoints (None: there are none)."""
        ranks = [int(path.name.split(".")[1].removeprefix("rank")) for path in self.checkpoint_dir.glob("latest.rank*.pt")]
        if ranks:
            return max(ranks) + 1
        return 1 if (self.checkpoint_dir / "latest.pt").exists() else None

    def _raise_if_any(self, problems: list[str | None]) -> None:
        found = [f"process {rank}: {problem}" for rank, problem in enumerate(problems) if problem]
        if found:
            raise RuntimeError("cannot resume:\n  " + "\n  ".join(found))

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        saved = sorted(payload["progress"]["replica_steps"])
        if saved != sorted(self.replica_steps):
            raise RuntimeError(f"checkpoint {path} holds replicas {saved}, this process holds "
                               f"{sorted(self.replica_steps)} (imwa.k or the number of processes changed)")
        for replica, state in zip(self.replicas, payload["replicas"]):
            replica.load_state_dict(state)
        self.episode = payload["progress"]["episode"]
        self.replica_steps = dict(payload["progress"]["replica_steps"])
        run_state = dict(payload["run_state"])
        set_rng_state(run_state.pop("rng"), self.trainer.device)
        self.pending = run_state.pop("pending")
        start = payload.get("episode_start")
        self.episode_start = None if start is None else to_device(start, self.trainer.device)
        self.state = {"cpu_threads": [], **run_state}  # checkpoints before cpu_threads was recorded lack it
        self._note_thread_count(path)
        if self.is_main:
            self._rewrite_metrics()
        self._clock = time.perf_counter()
        log.info("resumed from %s: episode %d, replica steps %s", path, self.episode + 1, self.replica_steps)

    def _note_thread_count(self, path: Path) -> None:
        """Record this launch's CPU thread count; say so when it differs from the checkpoint's, since
        the steps from here on are then not bitwise those of an uninterrupted run."""
        threads, history = torch.get_num_threads(), self.state["cpu_threads"]
        if history and history[-1] != threads and self.trainer.device.type == "cpu":
            log.warning("%s was written with %d CPU threads, this resume uses %d: the result will differ from an "
                        "uninterrupted run in the last bits (reductions split by thread count); "
                        "train.num_threads=%d continues it bitwise", path, history[-1], threads, history[-1])
        if not history or history[-1] != threads:
            history.append(threads)

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl rebuilt from the run's history as restored (empty when starting again), atomically.

        The checkpoint is the record: the file may hold rows logged after it (dropped, so a resumed run
        does not log them twice), a torn last line, or nothing at all; its lines up to the checkpoint
        are regenerated byte for byte (the same records, the same json.dumps).
        """
        records = self.state["evaluations"]
        old = self.logger.rewrite_metrics(records)
        self.state["metrics_lines"] = len(records)
        expected = "".join(metrics_line(record) for record in records).encode()
        if records and (old is None or not old.startswith(expected)):
            log.warning("%s %s: rewrote its %d evaluations up to the checkpoint from the checkpoint",
                        self.logger.metrics_path, "was missing" if old is None else "was damaged or incomplete",
                        len(records))

    # ----- training ----------------------------------------------------------------------
    def _train_replica(self, replica: Replica, episode_end: int, progress: tqdm) -> bool:
        """Train `replica` up to `episode_end`; False when train.stop_at interrupted the run."""
        train = self.cfg.train
        images_per_step = self.trainer.images_per_step(replica)
        while self.replica_steps[replica.index] < episode_end:
            step = self.replica_steps[replica.index]
            outputs = self.trainer.step(replica, step)
            self.replica_steps[replica.index] = done = step + 1
            self._watch_loss(replica, outputs["loss"], done)
            self.state["images"] += images_per_step
            progress.update(1)
            if done % train.log_every == 0 or done == episode_end:
                self._ensure_finite([replica])
                scalars = host_scalars(outputs, self.data_parallel)
                scalars["lr"] = lr_at(train, step)
                if self.leads:
                    self.logger.scalars(f"replica{replica.index}", scalars, done)
                progress.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
            evaluated = done % train.eval_every == 0 or done == episode_end
            if evaluated and self.leads:
                self._ensure_finite([replica])
                test = self._evaluate(replica.teacher.module, "replica", replica.index, done)
                progress.set_postfix(top1=f"{test['top1']:.3f}", bal=f"{test['balanced_acc']:.3f}", refresh=False)
                self._log_evaluation(replica, done, test)
                if self.watch_teacher and self.is_main:
                    self._warn_if_the_teacher_lags(replica, done, test)
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or (
                    not train.checkpoint_every and evaluated):
                self._save("latest.pt")
            if train.stop_at and done == train.stop_at:
                self._save("latest.pt")
                return False
            if self.stop.signal_name:
                self._save("latest.pt")
                message = (f"stopped by {self.stop.signal_name} after step {done} of replica {replica.index}, with a "
                           f"checkpoint there; continue with: python main.py resume=true hydra.run.dir={self.cfg.run_dir}")
                log.log(logging.WARNING if self.is_main else logging.INFO, "%s", message)
                raise Terminated(message, self.stop.signal_name)
        return True

    def _log_evaluation(self, replica: Replica, done: int, test: dict[str, Any]) -> None:
        """One line per evaluation: what a log file (no progress bar) shows of a run's progress."""
        total = len(self.replicas) * self.cfg.train.iterations
        remaining = total - sum(self.replica_steps.values())
        trained = total - remaining - self.steps_at_launch
        elapsed = time.perf_counter() - self.launch_clock
        eta = tqdm.format_interval(remaining * elapsed / trained) if trained else "?"
        log.info("replica %d step %d/%d: top1 %.4f balanced %.4f | %.0f images/s | ETA %s", replica.index, done,
                 self.cfg.train.iterations, test["top1"], test["balanced_acc"],
                 self.state["images"] / max(self.state["train_seconds"], 1e-9), eta)

    def _warn_if_the_teacher_lags(self, replica: Replica, done: int, test: dict[str, Any]) -> None:
        """Compare the evaluated EMA teacher with its student, once it has lagged, or until the teacher
        has seen one averaging horizon, 1 / (1 - decay) steps.

        A teacher with decay 0.999 and no warm-up averages over ~1,000 steps, so a short run reports
        near-chance accuracy while its student has learned: say so, with the fix, instead of letting
        the run look broken. Only without EMA warm-up (which shortens the horizon early on); it costs
        one extra evaluation of the student at each of those evaluations.
        """
        ema = self.cfg.algorithm.ema
        horizon = round(1 / max(1 - ema.decay, 1e-9))
        student = self.evaluator.evaluate(replica.model, "test")["top1"]
        lagging = student - test["top1"] > TEACHER_LAG_WARNING
        if lagging:
            log.warning("at step %d the evaluated EMA teacher scores top1 %.3f, its student %.3f: with decay %s and "
                        "no warm-up the teacher averages over about %d steps. For a run this short set "
                        "algorithm.ema.warmup=true or a lower algorithm.ema.decay", done, test["top1"], student,
                        ema.decay, horizon)
        self.watch_teacher = not lagging and done < horizon

    def _merge(self, start: dict[str, Any]) -> MergeResult:
        indices = [replica.index for replica in self.replicas]
        result = self.merger([replica.state_dict() for replica in self.replicas], indices, start, self.episode)
        for replica in self.replicas:
            replica.model.load_state_dict(result.model)
            replica.teacher.load_state_dict(result.teacher)
            # Optimizer.load_state_dict (and an algorithm's) may keep the given tensors rather than copy
            # them: without a copy, time-sliced replicas would share, and mutate, one momentum buffer.
            if result.optimizer is not None:
                replica.optimizer.load_state_dict(copy.deepcopy(result.optimizer))
            replica.algorithm.load_state_dict(copy.deepcopy(result.algorithm))
        return result

    def run(self) -> dict[str, Any] | None:
        """Train all episodes; returns results on process 0 (None elsewhere or when stopped by train.stop_at)."""
        episodes = self.cfg.imwa.episodes
        if self.is_main:
            self.logger.status("running")
        # A bar only in a terminal: in a log file (SLURM, nohup) its carriage-return updates are noise,
        # and the per-evaluation log lines say the same. In a terminal, log lines print above the bar.
        bar = self.cfg.train.progress and self.is_main and sys.stderr.isatty()
        self.steps_at_launch, self.launch_clock = sum(self.replica_steps.values()), time.perf_counter()
        with tqdm(total=len(self.replicas) * self.cfg.train.iterations, initial=sum(self.replica_steps.values()),
                  disable=not bar, dynamic_ncols=True) as progress, logging_redirect_tqdm():
            while self.episode < episodes:
                episode_end = (self.episode + 1) * self.steps_per_episode
                if self.episode_start is None:   # every replica holds it now: they start from one state
                    start = {"model": self.replicas[0].model.state_dict(),
                             "teacher": self.replicas[0].teacher.state_dict()}
                    self.episode_start = {part: {key: value.clone() for key, value in tensors.items()}
                                          for part, tensors in start.items()}
                for replica in self.replicas:
                    progress.set_description(f"episode {self.episode + 1}/{episodes} replica {replica.index}")
                    if not self._train_replica(replica, episode_end, progress):
                        if self.is_main:
                            self.logger.status("stopped")
                        return None
                self._end_episode(episode_end, self.episode_start)
        return self.results() if self.is_main else None

    def _end_episode(self, episode_end: int, start: dict[str, Any]) -> None:
        self._collect_pending()
        merge = self._merge(start) if self.k > 1 else None
        self.episode_start = None
        report = merge.report if merge else {"strategy": "identity (k=1)", "seconds": 0.0}
        if self.is_main:
            # K=1 has no merge: its model is replica 0's, evaluated at this very step a moment ago.
            test = (self._evaluate(self.replicas[0].teacher.module, "merged", None, episode_end) if merge
                    else self._evaluation_at(episode_end))
            if merge:
                self.logger.scalars("merged", {key: value for key, value in report.items()
                                               if isinstance(value, (int, float)) and not isinstance(value, bool)},
                                    episode_end, prefix="merge")
            else:  # the `merged` stream holds the run's model after every episode: for K=1, replica 0's
                for record in self._evaluations_at(episode_end):
                    self.logger.evaluation_scalars(record, None, stream="merged")
            self.state["merges"].append({"episode": self.episode + 1, "step": episode_end, **report,
                                         **{key: test[key] for key in SUMMARY_METRICS}})
            log.info("episode %d/%d merged (%s, %.2f s): top1 %.4f balanced %.4f", self.episode + 1,
                     self.cfg.imwa.episodes, report["strategy"], report["seconds"], test["top1"],
                     test["balanced_acc"])
        self.episode += 1
        merge_checkpoint = self._save(f"merge_{self.episode:03d}.pt")
        if merge_checkpoint is not None:
            link_atomic(merge_checkpoint, self.checkpoint_dir / self._checkpoint_name("latest.pt"))
            self._remove_old_merges()

    def _remove_old_merges(self) -> None:
        """imwa.keep_merges=N: only the newest N merge checkpoints stay (after the newest is safely written)."""
        keep = self.cfg.imwa.keep_merges
        for episode in range(1, self.episode - keep + 1 if keep else 1):
            (self.checkpoint_dir / self._checkpoint_name(f"merge_{episode:03d}.pt")).unlink(missing_ok=True)

    def _evaluations_at(self, step: int) -> list[dict[str, Any]]:
        """Replica 0's evaluation records (test, then val if any) at `step` (K=1), the last of each split."""
        latest = {entry["split"]: entry for entry in self.state["evaluations"]
                  if entry["source"] == "replica" and entry["replica"] == 0 and entry["step"] == step}
        return [latest[split] for split in ("test", "val") if split in latest]

    def _evaluation_at(self, step: int) -> dict[str, Any]:
        """Replica 0's test evaluation record at `step` (K=1)."""
        return next(entry for entry in reversed(self.state["evaluations"]) if entry["split"] == "test"
                    and entry["source"] == "replica" and entry["replica"] == 0 and entry["step"] == step)

    def results(self) -> dict[str, Any]:
        evaluations = self.state["evaluations"]
        tests = [entry for entry in evaluations if entry["split"] == "test"]
        representative = [entry for entry in tests if self._representative(entry["source"], entry["replica"])]
        final = representative[-1]
        replicas_final = []
        for index in range(self.k):
            own = [entry for entry in tests if entry["source"] == "replica" and entry["replica"] == index]
            replicas_final.append({"replica": index, "final": own[-1] if own else None})
        seconds = self.state["train_seconds"]
        return {
            "status": "complete",
            "final": {key: final[key] for key in (*SUMMARY_METRICS, "per_class", "step")},
            "best": ({**self.state["best"], "selected_on": "val"} if self.state["best"] else None),
            "median_last20": {key: median_of_last([entry[key] for entry in representative])
                              for key in ("top1", "balanced_acc")},
            "split_counts": self.split_counts,
            "wall_time_s": seconds,
            # images this process trained on; with W processes the run's throughput is about W times this
            "images_per_s": self.state["images"] / seconds if seconds else float("nan"),
            "cpu_threads": self.state["cpu_threads"],
            # this process's peak of allocated GPU memory (None off CUDA)
            "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(self.trainer.device) / 2 ** 20
                                   if self.trainer.device.type == "cuda" else None),
            "imwa": {"k": self.k, "episodes": self.cfg.imwa.episodes, "merge": self.cfg.imwa.merge,
                     "momentum": self.cfg.imwa.momentum,
                     "processes": self.comm.world_size * self.data_parallel.world_size,
                     "data_parallel": self.data_parallel.world_size,
                     "per_episode": self.state["merges"]},
            "replicas": replicas_final,
        }
