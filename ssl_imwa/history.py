"""The run's history: its evaluations, merges, best model and counters, the record that metrics.jsonl and
results.json are written from.

It is checkpointed with the replicas (`checkpoint_state`), so a resume restores it and rewrites
metrics.jsonl from it: the checkpoint is the record, whatever the file held after it. Process 0
keeps the history; other processes queue their evaluations (`pending`) until the next merge hands
them to process 0.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ssl_imwa.distributed import Communicator
from ssl_imwa.keys import SUMMARY_METRICS
from ssl_imwa.metrics import median_of_last
from ssl_imwa.run_logger import RunLogger, metrics_line

log = logging.getLogger("ssl_imwa")


class RunHistory:
    """What the run has done so far, on one process; `is_main` (process 0) writes it to the run's files."""

    def __init__(self, logger: RunLogger, k: int, is_main: bool, split_counts: dict[str, list[int]]) -> None:
        self.logger = logger
        self.k = k
        self.is_main = is_main
        self.split_counts = split_counts
        # Evaluations of this process's replicas not yet handed to process 0 (W > 1 only).
        self.pending: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {
            "evaluations": [], "merges": [], "train_seconds": 0.0, "images": 0, "metrics_lines": 0, "best": None,
            # Intra-op CPU threads of each launch (one entry per resume that changed it): on the CPU the
            # thread count splits reductions differently, so it is part of what makes a run repeatable.
            "cpu_threads": [torch.get_num_threads()],
        }
        self._clock = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds so far, this launch's added up to now."""
        now = time.perf_counter()
        self.state["train_seconds"] += now - self._clock
        self._clock = now
        return self.state["train_seconds"]

    # ----- evaluations ---------------------------------------------------------------------------
    def keep(self, record: dict[str, Any]) -> None:
        """Process 0 appends to metrics.jsonl and the run's history; others queue it for the next merge."""
        if not self.is_main:
            self.pending.append(record)
            return
        self.logger.append_metrics(record)
        self.state["metrics_lines"] += 1
        self.state["evaluations"].append(record)

    def collect_pending(self, comm: Communicator) -> None:
        """Every process's queued evaluations, kept by process 0 in process order, and the scalars they
        queued for the experiment trackers, which process 0 logs."""
        queued = self.logger.tracker_queue or []
        for records, tracker_scalars in comm.all_gather_object((self.pending, queued), "evaluation gather")[1:]:
            if self.is_main:
                for record in records:
                    self.keep(record)
                self.logger.track(tracker_scalars)
        self.pending = []
        if self.logger.tracker_queue is not None:
            self.logger.tracker_queue = []

    def representative(self, source: str, replica: int | None) -> bool:
        """The evaluations that describe the run's output model: replica 0 when K=1, merges otherwise."""
        return source == "merged" if self.k > 1 else (source == "replica" and replica == 0)

    def improves_best(self, source: str, replica: int | None, step: int, results: dict[str, Any]) -> bool:
        """Record a representative model's evaluation as the best when its validation top-1 is the
        highest yet (selection on val, the test metrics beside it); True when it is."""
        if not self.representative(source, replica):
            return False
        best = self.state["best"]
        if not (best is None or results["val"]["top1"] > best["val_top1"]):
            return False
        test = results["test"]
        self.state["best"] = {"step": step, "val_top1": results["val"]["top1"],
                              **{key: test[key] for key in (*SUMMARY_METRICS, "per_class")}}
        return True

    def evaluations_at(self, step: int) -> list[dict[str, Any]]:
        """Replica 0's evaluation records (test, then val if any) at `step` (K=1), the last of each split."""
        latest = {entry["split"]: entry for entry in self.state["evaluations"]
                  if entry["source"] == "replica" and entry["replica"] == 0 and entry["step"] == step}
        return [latest[split] for split in ("test", "val") if split in latest]

    def evaluation_at(self, step: int) -> dict[str, Any]:
        """Replica 0's test evaluation record at `step` (K=1)."""
        return next(entry for entry in reversed(self.state["evaluations"]) if entry["split"] == "test"
                    and entry["source"] == "replica" and entry["replica"] == 0 and entry["step"] == step)

    def record_merge(self, entry: dict[str, Any]) -> None:
        self.state["merges"].append(entry)

    # ----- checkpoint and resume -----------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The history as a checkpoint's `run_state` holds it (with the queued evaluations)."""
        return {**self.state, "pending": self.pending, "pending_tracker_scalars": list(self.logger.tracker_queue or [])}

    def restore(self, run_state: dict[str, Any], path: Path, on_cpu: bool) -> None:
        """The history of checkpoint `path` (its run_state, the RNG state taken out); process 0 rewrites
        metrics.jsonl from it."""
        run_state = dict(run_state)
        self.pending = run_state.pop("pending")
        # Dropped when this launch logs to no tracker; none in a checkpoint of a run that queued none.
        queued = run_state.pop("pending_tracker_scalars", [])
        if self.logger.tracker_queue is not None:
            self.logger.tracker_queue = list(queued)
        self.state = {"cpu_threads": [], **run_state}
        self._note_thread_count(path, on_cpu)
        if self.is_main:
            self.rewrite_metrics()
        self._clock = time.perf_counter()

    def _note_thread_count(self, path: Path, on_cpu: bool) -> None:
        """Record this launch's CPU thread count; say so when it differs from the checkpoint's, since
        the steps from here on are then not bitwise those of an uninterrupted run."""
        threads, history = torch.get_num_threads(), self.state["cpu_threads"]
        if history and history[-1] != threads and on_cpu:
            log.warning("%s was written with %d CPU threads, this resume uses %d: the result will differ from an "
                        "uninterrupted run in the last bits (reductions split by thread count); "
                        "train.num_threads=%d continues it bitwise", path, history[-1], threads, history[-1])
        if not history or history[-1] != threads:
            history.append(threads)

    def rewrite_metrics(self) -> None:
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

    def lost_history(self, latest: Path, first_checkpoint: int) -> str | None:
        """Why this run, which has no checkpoint, must not start again from step 0 (None: it may).

        Its results.json says it finished; an evaluation in metrics.jsonl after `first_checkpoint`,
        the first step at which a checkpoint is written, says it had one. Either way its checkpoints
        were deleted or lost.
        """
        run_dir = self.logger.run_dir
        where = f"{latest.parent} holds no checkpoint ({latest.name} does not exist)"
        advice = ("resume=true cannot continue it and does not train it again over its record: restore its "
                  "checkpoints, or start a new run in another directory")
        if (run_dir / "results.json").exists():
            return f"{where}, but the run finished ({run_dir / 'results.json'} is there): {advice}"
        steps = []
        try:
            for line in self.logger.metrics_path.read_text().splitlines():
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):   # a torn or foreign line proves nothing
                    continue
        except (OSError, ValueError):   # no file, or not text
            return None
        if steps and max(steps) > first_checkpoint:
            return (f"{where}, but {self.logger.metrics_path} holds evaluations up to step {max(steps)}, past "
                    f"the first checkpoint at step {first_checkpoint}: {advice}")
        return None

    # ----- results -------------------------------------------------------------------------------
    def results(self, imwa: dict[str, Any], peak_gpu_memory_mb: float | None) -> dict[str, Any]:
        """results.json's contents: the final and best model, the last evaluations' median, each replica's
        final evaluation, throughput, and `imwa` (the run's K, E, merge and processes) with each merge."""
        tests = [entry for entry in self.state["evaluations"] if entry["split"] == "test"]
        representative = [entry for entry in tests if self.representative(entry["source"], entry["replica"])]
        final = representative[-1]
        replicas_final = []
        for index in range(self.k):
            own = [entry for entry in tests if entry["source"] == "replica" and entry["replica"] == index]
            replicas_final.append({"replica": index, "final": own[-1] if own else None})
        seconds = self.state["train_seconds"]
        validations = [entry for entry in self.state["evaluations"] if entry["split"] == "val"
                       and self.representative(entry["source"], entry["replica"])]
        return {
            "status": "complete",
            "final": {key: final[key] for key in (*SUMMARY_METRICS, "per_class", "step")},
            # the same model on the held-out split (dataset.val_per_class > 0): what a hyperparameter search reads
            "final_val": ({key: validations[-1][key] for key in (*SUMMARY_METRICS, "per_class", "step")}
                          if validations else None),
            "best": ({**self.state["best"], "selected_on": "val"} if self.state["best"] else None),
            "median_last20": {key: median_of_last([entry[key] for entry in representative])
                              for key in ("top1", "balanced_acc")},
            "split_counts": self.split_counts,
            "wall_time_s": seconds,
            # images this process trained on; with W processes the run's throughput is about W times this
            "images_per_s": self.state["images"] / seconds if seconds else float("nan"),
            "cpu_threads": self.state["cpu_threads"],
            "peak_gpu_memory_mb": peak_gpu_memory_mb,
            "imwa": {**imwa, "per_episode": self.state["merges"]},
            "replicas": replicas_final,
        }
