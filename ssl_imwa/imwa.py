"""The IMWA orchestrator: K resident replicas, E episodes on the global step, a merge after each.

K=1, E=1 is a plain run; E=1 is vanilla MWA. Replicas keep their own data streams across
episodes, so replica k's data in episode e is fixed by (seed, k, e) and K=1 with any E is
bitwise the plain run (merging one replica is the identity).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ssl_imwa.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic
from ssl_imwa.config import Config
from ssl_imwa.evaluation import Evaluator
from ssl_imwa.logging import RunLogger
from ssl_imwa.merge import MergeResult, uniform_merge
from ssl_imwa.metrics import median_of_last
from ssl_imwa.trainer import Replica, Trainer, lr_at

log = logging.getLogger("ssl_imwa")
SUMMARY_KEYS = ("top1", "balanced_acc", "macro_f1", "head", "medium", "tail")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Orchestrator:
    """Owns replicas, episodes, merges, evaluation bookkeeping and run-level checkpoints."""

    def __init__(self, cfg: Config, replicas: list[Replica], trainer: Trainer, evaluator: Evaluator,
                 logger: RunLogger, fingerprint: dict[str, Any], split_counts: dict[str, list[int]]) -> None:
        self.cfg = cfg
        self.replicas = replicas
        self.trainer = trainer
        self.evaluator = evaluator
        self.logger = logger
        self.fingerprint = fingerprint
        self.split_counts = split_counts
        self.checkpoint_dir = Path(cfg.run_dir) / "checkpoints"
        self.steps_per_episode = cfg.train.iterations // cfg.imwa.episodes
        self.episode = 0
        self.replica_steps = [0 for _ in replicas]
        self.state: dict[str, Any] = {
            "evaluations": [], "merges": [], "train_seconds": 0.0, "images": 0, "metrics_lines": 0,
            "best": None,
        }
        self._clock = time.perf_counter()

    # ----- bookkeeping -------------------------------------------------------------------
    def _elapsed(self) -> float:
        now = time.perf_counter()
        self.state["train_seconds"] += now - self._clock
        self._clock = now
        return self.state["train_seconds"]

    def _record(self, source: str, replica: int | None, split: str, step: int, metrics: dict[str, Any]) -> None:
        self.logger.evaluation(source, replica, self.episode + 1, split, step, metrics, self._elapsed())
        self.state["metrics_lines"] += 1
        self.state["evaluations"].append({
            "source": source, "replica": replica, "episode": self.episode + 1, "split": split, "step": step,
            **{key: metrics[key] for key in SUMMARY_KEYS}, "per_class": metrics["per_class"],
        })

    def _representative(self, source: str, replica: int | None) -> bool:
        """The evaluations that describe the run's output model: replica 0 when K=1, merges otherwise."""
        return source == "merged" if len(self.replicas) > 1 else (source == "replica" and replica == 0)

    def _evaluate(self, module: torch.nn.Module, source: str, replica: int | None, step: int) -> dict[str, Any]:
        test = self.evaluator.evaluate(module, "test")
        self._record(source, replica, "test", step, test)
        if "val" in self.evaluator.splits:
            val = self.evaluator.evaluate(module, "val")
            self._record(source, replica, "val", step, val)
            best = self.state["best"]
            if self._representative(source, replica) and (best is None or val["top1"] > best["val_top1"]):
                self.state["best"] = {"step": step, "val_top1": val["top1"],
                                      **{key: test[key] for key in SUMMARY_KEYS}, "per_class": test["per_class"]}
                self._save("best.pt")
        self.logger.status("running")
        return test

    def _payload(self) -> dict[str, Any]:
        self._elapsed()
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "progress": {"episode": self.episode, "replica_steps": list(self.replica_steps)},
            "replicas": [replica.state_dict() for replica in self.replicas],
            "run_state": {**self.state, "rng": _rng_state()},
        }

    def _save(self, name: str) -> None:
        save_atomic(self._payload(), self.checkpoint_dir / name)

    def resume(self) -> None:
        """Restore every replica, the episode cursor and the run's history from latest.pt."""
        payload = load_checkpoint(self.checkpoint_dir / "latest.pt", self.fingerprint)
        if len(payload["replicas"]) != len(self.replicas):
            raise RuntimeError(f"checkpoint holds {len(payload['replicas'])} replicas, config asks imwa.k="
                               f"{len(self.replicas)}")
        for replica, state in zip(self.replicas, payload["replicas"]):
            replica.load_state_dict(state)
        self.episode = payload["progress"]["episode"]
        self.replica_steps = list(payload["progress"]["replica_steps"])
        run_state = dict(payload["run_state"])
        _set_rng_state(run_state.pop("rng"))
        self.state = run_state
        self._truncate_metrics(self.state["metrics_lines"])
        self._clock = time.perf_counter()
        log.info("resumed from %s: episode %d, replica steps %s", self.checkpoint_dir / "latest.pt",
                 self.episode + 1, self.replica_steps)

    def _truncate_metrics(self, lines: int) -> None:
        """Drop evaluations logged after the checkpoint, so a resumed run does not log them twice."""
        path = self.logger.metrics_path
        if path.exists():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            path.write_text("".join(kept))

    # ----- training ----------------------------------------------------------------------
    def _train_replica(self, replica: Replica, episode_end: int, progress: tqdm) -> bool:
        """Train `replica` up to `episode_end`; False when train.stop_at interrupted the run."""
        train = self.cfg.train
        images_per_step = self.trainer.images_per_step(replica)
        source = f"replica{replica.index}"
        while self.replica_steps[replica.index] < episode_end:
            step = self.replica_steps[replica.index]
            outputs = self.trainer.step(replica, step)
            self.replica_steps[replica.index] = done = step + 1
            self.state["images"] += images_per_step
            progress.update(1)
            if done % train.log_every == 0 or done == episode_end:
                scalars = {key: float(value) for key, value in outputs.items()}
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"replica {replica.index}: loss is {scalars['loss']} at step {done}")
                scalars["lr"] = lr_at(train, step)
                self.logger.scalars(source, scalars, done)
                progress.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
            evaluated = done % train.eval_every == 0 or done == episode_end
            if evaluated:
                test = self._evaluate(replica.teacher.module, "replica", replica.index, done)
                progress.set_postfix(top1=f"{test['top1']:.3f}", bal=f"{test['balanced_acc']:.3f}", refresh=False)
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or (
                    not train.checkpoint_every and evaluated):
                self._save("latest.pt")
            if train.stop_at and done == train.stop_at:
                self._save("latest.pt")
                return False
        return True

    def _merge(self) -> MergeResult:
        states = [replica.state_dict() for replica in self.replicas]
        result = uniform_merge(states, self.cfg.imwa.momentum, self.replicas[0].algorithm.merge_states)
        for replica in self.replicas:
            replica.model.load_state_dict(result.model)
            replica.teacher.load_state_dict(result.teacher)
            if result.optimizer is not None:
                replica.optimizer.load_state_dict(result.optimizer)
            replica.algorithm.load_state_dict(result.algorithm)
        return result

    def run(self) -> dict[str, Any] | None:
        """Train all episodes; returns results, or None if stopped early by train.stop_at."""
        k, episodes = len(self.replicas), self.cfg.imwa.episodes
        total = k * self.cfg.train.iterations
        self.logger.status("running")
        with tqdm(total=total, initial=sum(self.replica_steps), disable=not self.cfg.train.progress,
                  dynamic_ncols=True) as progress:
            while self.episode < episodes:
                episode_end = (self.episode + 1) * self.steps_per_episode
                for replica in self.replicas:
                    progress.set_description(f"episode {self.episode + 1}/{episodes} replica {replica.index}")
                    if not self._train_replica(replica, episode_end, progress):
                        self.logger.status("stopped")
                        return None
                merge = self._merge() if k > 1 else None
                test = self._evaluate(self.replicas[0].teacher.module, "merged", None, episode_end)
                report = merge.report if merge else {"strategy": "identity (k=1)", "seconds": 0.0}
                self.state["merges"].append({"episode": self.episode + 1, "step": episode_end, **report,
                                             **{key: test[key] for key in SUMMARY_KEYS}})
                log.info("episode %d/%d merged (%s): top1 %.4f balanced %.4f", self.episode + 1, episodes,
                         report["strategy"], test["top1"], test["balanced_acc"])
                self.episode += 1
                self._save(f"merge_{self.episode:03d}.pt")
                self._save("latest.pt")
        return self.results()

    def results(self) -> dict[str, Any]:
        evaluations = self.state["evaluations"]
        representative = [entry for entry in evaluations if entry["split"] == "test"
                          and self._representative(entry["source"], entry["replica"])]
        merged = [entry for entry in evaluations if entry["split"] == "test" and entry["source"] == "merged"]
        final = merged[-1]
        replicas_final = []
        for replica in self.replicas:
            own = [e for e in evaluations if e["split"] == "test" and e["source"] == "replica"
                   and e["replica"] == replica.index]
            replicas_final.append({"replica": replica.index, "final": own[-1] if own else None})
        seconds = self.state["train_seconds"]
        return {
            "status": "complete",
            "final": {key: final[key] for key in (*SUMMARY_KEYS, "per_class", "step")},
            "best": ({**self.state["best"], "selected_on": "val"} if self.state["best"] else None),
            "median_last20": {key: median_of_last([e[key] for e in representative]) for key in
                              ("top1", "balanced_acc")},
            "split_counts": self.split_counts,
            "wall_time_s": seconds,
            "images_per_s": self.state["images"] / seconds if seconds else float("nan"),
            "imwa": {"k": len(self.replicas), "episodes": self.cfg.imwa.episodes,
                     "merge": self.cfg.imwa.merge, "momentum": self.cfg.imwa.momentum,
                     "per_episode": self.state["merges"]},
            "replicas": replicas_final,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

