"""One run per run directory: a fresh run never overwrites another, and two never write at once."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


def used_by_a_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows that a run already trained there (None: nothing; Hydra's own
    `.hydra/` and a failed configuration's `status.json` do not count)."""
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("*.pt"))
    if checkpoints:
        return f"checkpoints ({', '.join(checkpoints[:3])}{', ...' if len(checkpoints) > 3 else ''})"
    if (run_dir / "metrics.jsonl").exists():
        return "metrics.jsonl"
    return None


def refuse_a_used_directory(run_dir: Path) -> None:
    found = used_by_a_run(run_dir)
    if found:
        raise FileExistsError(f"run directory {run_dir} already holds a run ({found}): continue it with resume=true, "
                              "or start a new one in another directory (hydra.run.dir=...)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunDirectoryLock:
    """`run_dir/.lock` holding the owner's pid, host and start time, created exclusively.

    A lock left by a process that is gone (same host, pid not running) is taken over, so a run
    killed with SIGKILL can be resumed; a live owner, or an owner on another host whose liveness
    cannot be checked from here, makes the second run refuse, naming the owner and the file.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                with open(self.path, "x") as handle:
                    json.dump(owner, handle)
                self.held = True
                return
            except FileExistsError:
                self._remove_if_stale()
        raise FileExistsError(f"{self.path} appeared again while it was being taken over: another run started here")

    def _remove_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            raise FileExistsError(f"{self.path} exists but cannot be read: another run may be using "
                                  f"{self.path.parent}; delete the file if none is") from None
        if host == socket.gethostname() and not _alive(pid):
            self.path.unlink(missing_ok=True)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise FileExistsError(f"run directory {self.path.parent} is in use by process {pid} on {where} (since "
                              f"{holder.get('started', '?')}); wait for it, or delete {self.path} if that process "
                              "is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
