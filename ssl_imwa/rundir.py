"""One run per run directory: a fresh run never overwrites another, and two never write at once."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ssl_imwa")

LOCK_NAME = ".lock"


def used_by_a_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows that a run already trained there (None: nothing; Hydra's own
    `.hydra/` and a failed configuration's `status.json` do not count)."""
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("*.pt"))
    if checkpoints:
        return f"checkpoints ({', '.join(checkpoints[:3])}{', ...' if len(checkpoints) > 3 else ''})"
    for record in ("metrics.jsonl", "results.json"):
        if (run_dir / record).exists():
            return record
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
    """`run_dir/.lock`, locked with `flock` for the run's life and holding the owner's pid, host and start.

    The kernel's lock is what excludes: taking it is atomic, and it is released when its holder
    exits however it exits, so a run killed with SIGKILL can be resumed, and of two processes that
    find a dead run's lock at once exactly one gets it. The owner written in the file names the
    holder in the refusal. A file naming a live process on this host, or a process on another host
    (whose liveness cannot be checked from here), without the kernel's lock held (a file system
    without locks, a run of an older version) also makes the second run refuse.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.held = False
        self._descriptor: int | None = None

    def acquire(self) -> None:
        for _ in range(100):   # retried only when the file was replaced while it was being locked
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not self._lock(descriptor):
                    raise FileExistsError(self._in_use_message(self._owner(descriptor), locked=True))
                if not self._is_current(descriptor):
                    os.close(descriptor)
                    continue
                self._refuse_a_live_owner(self._owner(descriptor))
                owner = {"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, json.dumps(owner).encode(), 0)
            except BaseException:
                os.close(descriptor)
                raise
            self._descriptor, self.held = descriptor, True
            return
        raise FileExistsError(f"{self.path} keeps being replaced while it is being locked: another run is starting "
                              f"in {self.path.parent}")

    def _lock(self, descriptor: int) -> bool:
        """Take the kernel's lock without waiting: False when another process holds it."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as error:   # no locks on this file system: the owner written in the file decides
            log.warning("cannot lock %s (%s): two runs started in this directory at the same moment would not "
                        "be told apart", self.path, os.strerror(error.errno or 0))
        return True

    def _is_current(self, descriptor: int) -> bool:
        """Whether the locked file is still the one at `path` (a releasing owner unlinks it before unlocking)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _owner(descriptor: int) -> dict[str, Any] | None:
        try:
            holder = json.loads(os.pread(descriptor, 4096, 0) or b"null")
            return {**holder, "pid": int(holder["pid"]), "host": str(holder["host"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _refuse_a_live_owner(self, holder: dict[str, Any] | None) -> None:
        """With the kernel's lock held: a file naming a process that still runs (or may) is still refused."""
        if holder is None or holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            return
        if holder["host"] != socket.gethostname() or _alive(holder["pid"]):
            raise FileExistsError(self._in_use_message(holder))

    def _in_use_message(self, holder: dict[str, Any] | None, locked: bool = False) -> str:
        """`locked`: the kernel says the holder runs, so deleting the file is no advice to give."""
        if holder is None:
            return (f"run directory {self.path.parent} is in use by another process (it holds the lock on "
                    f"{self.path}); wait for it")
        where = "this host" if holder["host"] == socket.gethostname() else f"host {holder['host']}"
        advice = f"; wait for it (it holds the lock on {self.path})" if locked else \
            f"; wait for it, or delete {self.path} if that process is gone"
        return (f"run directory {self.path.parent} is in use by process {holder['pid']} on {where} (since "
                f"{holder.get('started', '?')}){advice}")

    def holder_died(self) -> dict[str, Any] | None:
        """The owner written in the lock file when that file is still there but nobody holds its kernel
        lock: its holder exited without releasing it (SIGKILL, the OOM killer). None otherwise (held,
        released, or a file system without locks, where it cannot be told). Asked by a process that
        does not hold the lock; the file is left as it is."""
        try:
            descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # held (BlockingIOError), or no locks here
            os.close(descriptor)
            return None
        try:
            return self._owner(descriptor) if self._is_current(descriptor) else None
        finally:
            os.close(descriptor)

    def release(self) -> None:
        if self.held and self._descriptor is not None:
            self.path.unlink(missing_ok=True)   # before unlocking: a waiting process then finds no stale file
            os.close(self._descriptor)
            self._descriptor, self.held = None, False
