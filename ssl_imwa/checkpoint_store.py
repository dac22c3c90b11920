"""A run's checkpoints: where each process writes them, and the newest state every process can resume from.

One file per process when replicas are spread over processes (`latest.rank<r>.pt`), written by the
leader (data-parallel rank 0) of each replica group. A resume takes this process's latest
checkpoint or, when that is damaged or missing, its newest intact merge checkpoint; with several
processes they first agree on the newest state they all have, going back to a merge checkpoint
(or the start) when one process is past a merge the others have not reached. Training is
deterministic, so the steps done twice come out the same.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_imwa.checkpoint import (
    FORMAT_VERSION,
    CorruptCheckpoint,
    link_atomic,
    load_checkpoint,
    save_atomic,
)
from ssl_imwa.distributed import Communicator
from ssl_imwa.keys import LAUNCH_KEYS

log = logging.getLogger("ssl_imwa")
# Why a run without any checkpoint must not start again from step 0 (None: it may), given the path
# its latest checkpoint would have: ssl_imwa.history.RunHistory.lost_history.
LostHistory = Callable[[Path], "str | None"]


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


class CheckpointStore:
    """RUN_DIR/checkpoints as seen by one process.

    `comm`: the processes holding the other replicas (one per replica group, this data-parallel
    rank), among which a resume is agreed; `data_parallel`: the processes sharing this process's
    replicas, whose rank 0 leads (it alone writes); the leader of group 0 is the main process.
    """

    def __init__(self, run_dir: Path, fingerprint: dict[str, Any], comm: Communicator,
                 data_parallel: Communicator | None = None) -> None:
        self.run_dir = run_dir
        self.directory = run_dir / "checkpoints"
        self.fingerprint = fingerprint
        self.comm = comm
        self.data_parallel = data_parallel or Communicator()
        self.leads = self.data_parallel.rank == 0
        self.is_main = comm.is_main and self.leads

    # ----- writing -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """This process's file `name`: one file per process when replicas are spread over processes."""
        if self.comm.world_size == 1:
            return self.directory / name
        stem, suffix = name.rsplit(".", 1)
        return self.directory / f"{stem}.rank{self.comm.rank}.{suffix}"

    def write(self, name: str, content: dict[str, Any]) -> Path | None:
        """`content` (progress, replicas, run_state, ...) as checkpoint `name`, atomically, stamped with the
        format version and the config's fingerprint; by the group's leader (None elsewhere)."""
        if not self.leads:
            return None
        path = self.path(name)
        save_atomic({"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, **content}, path)
        return path

    def publish_merge(self, merge_checkpoint: Path | None, episode: int, keep: int) -> None:
        """The merge checkpoint just written becomes `latest`; with `keep` > 0 only the newest `keep`
        merge checkpoints stay (the older ones go only after the newest is safely written)."""
        if merge_checkpoint is None:
            return
        link_atomic(merge_checkpoint, self.path("latest.pt"))
        for old in range(1, episode - keep + 1 if keep else 1):
            self.path(f"merge_{old:03d}.pt").unlink(missing_ok=True)

    # ----- finding -------------------------------------------------------------------------------
    def newest_intact(self) -> tuple[dict[str, Any] | None, Path]:
        """This process's latest checkpoint or, when that is missing or unreadable, its newest readable
        merge checkpoint: a consistent state, from which the steps after it are trained again
        (deterministically). None when there is no checkpoint at all; raises when checkpoints exist
        but none can be read, or when one belongs to another experiment (never a silent fresh start)."""
        latest = self.path("latest.pt")
        merges = [path for path in self.directory.glob(self.path("merge_*.pt").name)
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

    def remove_stale_temporaries(self) -> None:
        """Half-written checkpoints of this process left by a kill during a write (never read: the
        rename that publishes a checkpoint did not happen)."""
        mine = self.path("*.pt").name
        for path in self.directory.glob(f"{mine}.*.tmp"):
            if self.comm.world_size > 1 or ".rank" not in path.name:
                path.unlink(missing_ok=True)
                log.info("removed %s, a checkpoint whose write was interrupted", path)

    def processes_that_wrote(self) -> int | None:
        """How many processes wrote this run's latest checkpoints (None: there are none)."""
        ranks = [int(path.name.split(".")[1].removeprefix("rank")) for path in self.directory.glob("latest.rank*.pt")]
        if ranks:
            return max(ranks) + 1
        return 1 if (self.directory / "latest.pt").exists() else None

    # ----- resuming ------------------------------------------------------------------------------
    def resume_point(self, lost_history: LostHistory) -> tuple[dict[str, Any], Path] | None:
        """The checkpoint this process resumes from and its path; None to start again from step 0.

        One process: its newest intact checkpoint. W processes: each may have been stopped at a
        different point, so they agree first (`_agree`). Raises when the launch cannot continue
        the run (another process count, damage, or a run whose checkpoints were lost).
        """
        if self.leads:
            self.remove_stale_temporaries()
        self._refuse_another_process_count()
        if self.comm.world_size > 1:
            return self._agree(lost_history)
        payload, source = self.newest_intact()
        if payload is None:
            self._start_again_or_refuse(source, lost_history)
            return None
        return payload, source

    def _refuse_another_process_count(self) -> None:
        writers = self.processes_that_wrote()
        if writers is None or writers == self.comm.world_size:
            return
        dp = self.data_parallel.world_size   # the run's own: imwa.data_parallel cannot change at a resume
        processes = writers * dp
        how = (f"torchrun --nproc_per_node={processes} main.py ... (or {processes} processes over the nodes)"
               if processes > 1 else "python main.py ... (no torchrun)")
        raise ValueError(f"run {self.run_dir} was written by {processes} process(es) "
                         f"({writers} replica group(s) of imwa.data_parallel={dp}), this resume has "
                         f"{self.comm.world_size * dp}: every group holds its own replicas, so resume with {how}")

    def _agree(self, lost_history: LostHistory) -> tuple[dict[str, Any], Path] | None:
        """Ranks whose latest checkpoints lie in the same episode continue from them (they train
        independently until the next merge); a rank already past a merge the others have not reached
        goes back to its checkpoint of the last merge they all passed (`merge_NNN`), or to the start
        if that is merge 0. Every process reports its problems before any raises: none waits for another."""
        payload, problem, newest = None, None, self.path("latest.pt")
        try:
            payload, newest = self.newest_intact()
        except (OSError, RuntimeError) as error:
            problem = f"{type(error).__name__}: {error}"
        if payload is None and problem is None and self.is_main:
            problem = lost_history(newest)
        episode = None if payload is None else payload["progress"]["episode"]
        everyone = self.comm.all_gather_object({"episode": episode, "problem": problem}, "resume agreement")
        self._raise_if_any([entry["problem"] for entry in everyone])
        if all(entry["episode"] is None for entry in everyone):
            self._start_again_or_refuse(self.directory / "latest.rank<r>.pt", lost_history)
            return None
        common = min(entry["episode"] or 0 for entry in everyone)
        source: Path | None = newest
        problem = None
        if episode is None or episode > common:
            payload, source, problem = self._go_back_to_merge(common, episode)
        # Every process takes part, those that stay where they are too: none waits for another.
        self._raise_if_any(self.comm.all_gather_object(problem, "resume agreement"))
        if episode is not None and episode > common:
            log.warning("process %d: latest checkpoint is past merge %d, which not every process has "
                        "reached: resuming from %s", self.comm.rank, common, source or "the start")
        if payload is None:
            log.info("process %d restarts from the beginning (no checkpoint before merge %d)", self.comm.rank,
                     common + 1)
            return None
        return payload, source

    def _go_back_to_merge(self, common: int, episode: int | None
                          ) -> tuple[dict[str, Any] | None, Path | None, str | None]:
        """This process's checkpoint of merge `common` (None, None for merge 0: the start), and why it
        cannot be read (None: it can)."""
        payload, problem = None, None
        source = self.path(f"merge_{common:03d}.pt") if common else None
        if source is not None:
            try:
                payload = load_checkpoint(source, self.fingerprint)
            except (OSError, RuntimeError) as error:
                problem = (f"its latest checkpoint is in episode {(episode or 0) + 1}, past the others' episode "
                           f"{common + 1}, and going back needs {source}: {type(error).__name__}: {error}")
        return payload, source, problem

    def _start_again_or_refuse(self, latest: Path, lost_history: LostHistory) -> None:
        """No checkpoint at all. A run that started here (its config.yaml is written before the first
        step) was stopped before its first checkpoint: nothing is lost by starting it again, and
        training is deterministic, so that is the resume. Anywhere else there is nothing to resume,
        and a run that went past its first checkpoint (its checkpoints were deleted or lost) is not
        trained again over its record."""
        if not (self.run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"checkpoint {latest} does not exist: nothing to resume (run without "
                                    "resume=true)")
        lost = lost_history(latest) if self.is_main else None
        if lost:
            raise FileNotFoundError(lost)
        log.warning("%s was stopped before its first checkpoint: starting it again from step 0", self.run_dir)

    @staticmethod
    def _raise_if_any(problems: list[str | None]) -> None:
        found = [f"process {rank}: {problem}" for rank, problem in enumerate(problems) if problem]
        if found:
            raise RuntimeError("cannot resume:\n  " + "\n  ".join(found))
