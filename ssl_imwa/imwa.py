"""The IMWA orchestrator: K resident replicas, E episodes on the global step, a merge after each.

K=1, E=1 is a plain run; E=1 is vanilla MWA. Replicas keep their own data streams across
episodes, so replica k's data in episode e is fixed by (seed, k, e) and K=1 with any E is
bitwise the plain run (merging one replica is the identity).

An algorithm may chain G generations (CReST): each is a whole IMWA run of train.iterations steps and E
episodes, the global step and the episode count going on across them. After the merge that ends a
generation, the merged EMA teacher labels the unlabeled set, the algorithm picks pseudo-labels, and the
next generation starts from fresh replicas (model, teacher, optimiser, schedule, streams) on the labeled
set with those added (RunParts.replicas_of_generation). With W processes in G = W / D
replica groups, this process holds replicas k with k mod G == its group; process 0 evaluates
the merged model and writes the run's files. Of the D data-parallel processes of a group, all
train and merge, and data-parallel rank 0 alone evaluates, logs and checkpoints (the D copies
of a replica are identical after every step: ssl_imwa.trainer).
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ssl_imwa.builders import RunParts
from ssl_imwa.checkpoint_store import CheckpointStore
from ssl_imwa.config import Config, generation_count
from ssl_imwa.distributed import Communicator, to_device
from ssl_imwa.history import RunHistory
from ssl_imwa.keys import SUMMARY_METRICS
from ssl_imwa.merge import (
    MergeResult,
    merge_model_momentum,
    merge_optimizers_and_algorithms,
)
from ssl_imwa.rng import rng_state, set_rng_state
from ssl_imwa.stopping import StopRequests, Terminated
from ssl_imwa.trainer import Replica, lr_at

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
    """The episode loop: trains this process's replicas up to each episode's end, evaluates them, merges
    them, and checkpoints; the run's record is its `history`, the files on disk its `store`."""

    def __init__(self, cfg: Config, parts: RunParts, history: RunHistory, store: CheckpointStore,
                 stop: StopRequests | None = None) -> None:
        self.cfg = cfg
        # comm: the processes holding the other replicas (one per replica group, this data-parallel rank);
        # data_parallel: the processes sharing this process's replicas. Its rank 0 leads: it alone evaluates,
        # logs and checkpoints; the run's files are written by the leader of group 0. The checkpoint store
        # agrees with the same processes, so both are taken from it.
        self.comm, self.data_parallel = store.comm, store.data_parallel
        self.leads, self.is_main = store.leads, store.is_main
        self.stop = stop or StopRequests()
        self.watch_teacher = not cfg.algorithm.ema.warmup
        self.steps_at_launch, self.launch_clock = 0, time.perf_counter()  # for the ETA
        self.replicas = parts.replicas
        self.k = cfg.imwa.k
        self.trainer = parts.trainer
        self.evaluator = parts.evaluator
        self.history = history
        self.logger = history.logger
        self.store = store
        self.merger = parts.merger
        self.steps_per_episode = cfg.train.iterations // cfg.imwa.episodes
        self.episode = 0
        self.generations = generation_count(cfg)
        self.replicas_of_generation = parts.replicas_of_generation
        # The generation the replicas train, the pseudo-labels it added to the labeled set (None in the
        # first), and those its end picked for the next one (held from the pick to the next start).
        self.generation = 0
        self.pseudo_labels: dict[str, torch.Tensor] | None = None
        self.next_pseudo_labels: dict[str, torch.Tensor] | None = None
        self.replica_steps = {replica.index: 0 for replica in self.replicas}
        # The episode's common start point, which TWA may use as a candidate; checkpointed when it
        # does, since after a resume mid-episode no replica holds it any more.
        self.episode_start: dict[str, Any] | None = None
        self.keeps_start = self.merger.needs_episode_start
        # Per replica, on the device: the first step whose loss was not finite (-1: none yet).
        self.first_nonfinite: dict[int, torch.Tensor] = {}

    # ----- evaluations and checkpoints ---------------------------------------------------
    def _evaluate(self, module: torch.nn.Module, source: str, replica: int | None, step: int) -> dict[str, Any]:
        results = {}
        for split in ("test", "val") if "val" in self.evaluator.splits else ("test",):
            metrics = self.evaluator.evaluate(module, split)
            record = {"step": step, "source": source, "replica": replica, "episode": self.episode + 1,
                      "split": split, **{key: metrics[key] for key in (*SUMMARY_METRICS, "per_class")},
                      "time_s": self.history.elapsed()}
            self.logger.evaluation_scalars(record, metrics["confusion"])
            self.history.keep(record)
            results[split] = metrics
        if "val" in results and self.history.improves_best(source, replica, step, results):
            self._save("best.pt")
        if self.is_main:
            self.logger.status("running")
        return results["test"]

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
        self.history.elapsed()
        return self.store.write(name, {
            "progress": {"episode": self.episode, "replica_steps": dict(self.replica_steps)},
            "replicas": [replica.state_dict() for replica in self.replicas],
            "run_state": {**self.history.checkpoint_state(), "rng": rng_state(self.trainer.device)},
            "episode_start": self.episode_start if self.keeps_start else None,
            **({"generation": {"index": self.generation, "pseudo_labels": self.pseudo_labels,
                               "next_pseudo_labels": self.next_pseudo_labels}} if self.generations > 1 else {}),
        })

    def resume(self) -> None:
        """Restore every replica, the episode cursor and the run's history from the newest common state
        (ssl_imwa.checkpoint_store: one process's latest checkpoint, or what W processes agree on), or
        start again from step 0 where the store says nothing is lost by it."""
        found = self.store.resume_point(self._lost_history)
        if found is None:
            if self.is_main:
                self.history.rewrite_metrics()
            return
        self._restore(*found)

    def _lost_history(self, latest: Path) -> str | None:
        """Why this run, which has no checkpoint, must not start again (None: it may)."""
        train = self.cfg.train
        return self.history.lost_history(latest, min(train.checkpoint_every or train.eval_every,
                                                     self.steps_per_episode))

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        saved = sorted(payload["progress"]["replica_steps"])
        if saved != sorted(self.replica_steps):
            raise RuntimeError(f"checkpoint {path} holds replicas {saved}, this process holds "
                               f"{sorted(self.replica_steps)} (imwa.k or the number of processes changed)")
        if self.generations > 1:
            self._restore_generation(payload.get("generation"), path)
        for replica, state in zip(self.replicas, payload["replicas"]):
            replica.load_state_dict(state)
        self.episode = payload["progress"]["episode"]
        self.replica_steps = dict(payload["progress"]["replica_steps"])
        run_state = dict(payload["run_state"])
        set_rng_state(run_state.pop("rng"), self.trainer.device)
        start = payload.get("episode_start")
        self.episode_start = None if start is None else to_device(start, self.trainer.device)
        self.history.restore(run_state, path, on_cpu=self.trainer.device.type == "cpu")
        log.info("resumed from %s: episode %d, replica steps %s", path, self.episode + 1, self.replica_steps)

    def _restore_generation(self, saved: dict[str, Any] | None, path: Path) -> None:
        """The replicas of the checkpoint's generation, before its states load into them."""
        if saved is None:
            raise RuntimeError(f"checkpoint {path} records no generation, but algorithm '{self.cfg.algorithm.name}' "
                               f"chains {self.generations}: it was not written by this run")
        if saved["index"] > 0:
            self._start_generation(saved["index"], saved["pseudo_labels"])
        self.next_pseudo_labels = saved["next_pseudo_labels"]

    # ----- generations -------------------------------------------------------------------
    def _pick_pseudo_labels(self) -> dict[str, torch.Tensor]:
        """The merged teacher over the unlabeled set, and the algorithm's picks from it (process 0's, for
        every process: identical models on different devices may still order near-ties differently)."""
        picks = None
        if self.is_main:
            replica = self.replicas[0]
            outputs = self.trainer.predict_unlabeled(replica.teacher.module, replica.stream)
            index, labels = replica.algorithm.pseudo_labels_for_next_generation(outputs)
            picks = {"unlabeled_index": index.long().cpu(), "labels": labels.long().cpu()}
        picks = self.comm.broadcast_object(picks, "pseudo-label broadcast")
        picks = self.data_parallel.broadcast_object(picks, "pseudo-label broadcast")
        return {key: value.cpu() for key, value in picks.items()}

    def _start_generation(self, generation: int, pseudo_labels: dict[str, torch.Tensor]) -> None:
        """Fresh replicas for `generation`, on the labeled set with `pseudo_labels` added; each algorithm
        inherits what it keeps from the previous generation's merged one."""
        previous = self.replicas[0].algorithm
        # In place: RunParts holds the same list, so the previous generation's replicas are freed.
        self.replicas[:] = self.replicas_of_generation(generation, (pseudo_labels["unlabeled_index"],
                                                                    pseudo_labels["labels"]))
        for replica in self.replicas:
            replica.algorithm.inherit(previous)
        self.generation, self.pseudo_labels, self.next_pseudo_labels = generation, pseudo_labels, None
        self.episode_start, self.first_nonfinite = None, {}
        per_class = torch.bincount(pseudo_labels["labels"], minlength=previous.num_classes).tolist()
        log.info("generation %d/%d: %d pseudo-labeled images join the labeled set (per class %s)", generation + 1,
                 self.generations, len(pseudo_labels["labels"]), per_class)

    # ----- training ----------------------------------------------------------------------
    def _train_replica(self, replica: Replica, episode_end: int, progress: tqdm) -> bool:
        """Train `replica` up to `episode_end`; False when train.stop_at interrupted the run."""
        train = self.cfg.train
        images_per_step = self.trainer.images_per_step(replica)
        while self.replica_steps[replica.index] < episode_end:
            step = self.replica_steps[replica.index]
            outputs = self.trainer.step(replica, step - self.generation * train.iterations)
            self.replica_steps[replica.index] = done = step + 1
            self._watch_loss(replica, outputs["loss"], done)
            self.history.state["images"] += images_per_step
            progress.update(1)
            if done % train.log_every == 0 or done == episode_end:
                self._ensure_finite([replica])
                scalars = host_scalars(outputs, self.data_parallel)
                scalars["lr"] = lr_at(train, step - self.generation * train.iterations)
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
        total = len(self.replicas) * self.cfg.train.iterations * self.generations
        remaining = total - sum(self.replica_steps.values())
        trained = total - remaining - self.steps_at_launch
        elapsed = time.perf_counter() - self.launch_clock
        eta = tqdm.format_interval(remaining * elapsed / trained) if trained else "?"
        log.info("replica %d step %d/%d: top1 %.4f balanced %.4f | %.0f images/s | ETA %s", replica.index, done,
                 self.cfg.train.iterations * self.generations, test["top1"], test["balanced_acc"],
                 self.history.state["images"] / max(self.history.state["train_seconds"], 1e-9), eta)

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
        """Momentum (per imwa.momentum) and the algorithm's state merged here, the same for every strategy;
        the strategy merges the students and teachers. Its report names it and times the whole merge
        unless the strategy says otherwise."""
        started = time.perf_counter()
        indices = [replica.index for replica in self.replicas]
        states = [replica.state_dict() for replica in self.replicas]
        optimizer, algorithm = merge_optimizers_and_algorithms(
            states, indices, self.cfg.imwa.momentum, self.replicas[0].algorithm.merge_states, self.k, self.comm)
        momentum = merge_model_momentum([state["model"] for state in states],
                                        self.replicas[0].algorithm.momentum_buffers(self.replicas[0].model),
                                        self.cfg.imwa.momentum, self.k, self.comm)
        result = self.merger([{"model": state["model"], "teacher": state["teacher"]} for state in states], indices,
                             start, self.episode)
        for replica, model_momentum in zip(self.replicas, momentum):
            replica.model.load_state_dict({**result.model, **model_momentum})
            replica.teacher.load_state_dict(result.teacher)
            # Optimizer.load_state_dict (and an algorithm's) may keep the given tensors rather than copy
            # them: without a copy, time-sliced replicas would share, and mutate, one momentum buffer.
            if optimizer is not None:
                replica.optimizer.load_state_dict(copy.deepcopy(optimizer))
            replica.algorithm.load_state_dict(copy.deepcopy(algorithm))
        result.report = {"strategy": self.merger.name, "seconds": time.perf_counter() - started, **result.report}
        return result

    def run(self) -> dict[str, Any] | None:
        """Train all episodes; returns results on process 0 (None elsewhere or when stopped by train.stop_at)."""
        episodes = self.cfg.imwa.episodes * self.generations
        if self.is_main:
            self.logger.status("running")
        # A bar only in a terminal: in a log file (SLURM, nohup) its carriage-return updates are noise,
        # and the per-evaluation log lines say the same. In a terminal, log lines print above the bar.
        bar = self.cfg.train.progress and self.is_main and sys.stderr.isatty()
        self.steps_at_launch, self.launch_clock = sum(self.replica_steps.values()), time.perf_counter()
        with tqdm(total=len(self.replicas) * self.cfg.train.iterations * self.generations,
                  initial=sum(self.replica_steps.values()),
                  disable=not bar, dynamic_ncols=True) as progress, logging_redirect_tqdm():
            while self.episode < episodes:
                if self.episode // self.cfg.imwa.episodes > self.generation:
                    self._start_generation(self.episode // self.cfg.imwa.episodes, self.next_pseudo_labels)
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
        self.history.collect_pending(self.comm)
        merge = self._merge(start) if self.k > 1 else None
        self.episode_start = None
        report = merge.report if merge else {"strategy": "identity (k=1)", "seconds": 0.0}
        if self.is_main:
            # K=1 has no merge: its model is replica 0's, evaluated at this very step a moment ago.
            test = (self._evaluate(self.replicas[0].teacher.module, "merged", None, episode_end) if merge
                    else self.history.evaluation_at(episode_end))
            if merge:
                self.logger.scalars("merged", {key: value for key, value in report.items()
                                               if isinstance(value, (int, float)) and not isinstance(value, bool)},
                                    episode_end, prefix="merge")
            else:  # the `merged` stream holds the run's model after every episode: for K=1, replica 0's
                for record in self.history.evaluations_at(episode_end):
                    self.logger.evaluation_scalars(record, None, stream="merged")
            self.history.record_merge({"episode": self.episode + 1, "step": episode_end, **report,
                                       **{key: test[key] for key in SUMMARY_METRICS}})
            log.info("episode %d/%d merged (%s, %.2f s): top1 %.4f balanced %.4f", self.episode + 1,
                     self.cfg.imwa.episodes * self.generations, report["strategy"], report["seconds"], test["top1"],
                     test["balanced_acc"])
        if (self.episode + 1) % self.cfg.imwa.episodes == 0 and self.generation + 1 < self.generations:
            # Before the merge checkpoint, which then holds them: a resume from it starts the next
            # generation with these very picks.
            self.next_pseudo_labels = self._pick_pseudo_labels()
        self.episode += 1
        self.store.publish_merge(self._save(f"merge_{self.episode:03d}.pt"), self.episode, self.cfg.imwa.keep_merges)

    def results(self) -> dict[str, Any]:
        """results.json's contents (process 0)."""
        device = self.trainer.device
        imwa = {"k": self.k, "episodes": self.cfg.imwa.episodes, "merge": self.cfg.imwa.merge,
                "momentum": self.cfg.imwa.momentum,
                "processes": self.comm.world_size * self.data_parallel.world_size,
                "data_parallel": self.data_parallel.world_size}
        # this process's peak of allocated GPU memory (None off CUDA)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
        return self.history.results(imwa, peak)
