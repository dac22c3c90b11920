"""Checkpoints: atomic writes (temp file + rename) and validated loads with clear errors."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Version 2 adds `sha256`, a digest of the payload's contents; version 1 files (no digest) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("format_version", "fingerprint", "progress", "replicas", "run_state")
DIGEST_KEY = "sha256"
# Config keys added after checkpoints were first written, with the value a checkpoint without them was
# trained with: such a checkpoint matches a config that keeps that value.
KEYS_ADDED_LATER = {"imwa.data_parallel": 1, "model.sync_batchnorm": False}


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not ours)."""


def contents_digest(obj: Any) -> str:
    """The SHA-256 of `obj`'s contents: values, dtypes, shapes and structure.

    torch's zip format carries no checksum a load verifies: a flipped byte inside a tensor loads
    silently as a different weight. The digest, stored in the file and recomputed after loading,
    catches that and any damage that still unpickles. Container classes are not hashed (a
    state_dict's OrderedDict is one mapping like any other), and only plain data is accepted, so
    the digest never depends on an object's address.
    """
    hasher = hashlib.sha256()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            hasher.update(f"map{len(node)}".encode())
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, (list, tuple)):
            hasher.update(f"seq{len(node)}".encode())
            for item in node:
                walk(item)
        elif isinstance(node, torch.Tensor):
            flat = node.detach().cpu().contiguous().reshape(-1)
            hasher.update(f"tensor{node.dtype}{tuple(node.shape)}".encode())
            hasher.update(flat.view(torch.uint8).numpy())
        elif isinstance(node, np.ndarray):
            hasher.update(f"array{node.dtype}{node.shape}".encode())
            hasher.update(np.ascontiguousarray(node).reshape(-1).view(np.uint8))
        elif node is None or isinstance(node, (str, bytes, bool, int, float, np.generic)):
            hasher.update(f"{type(node).__name__}{node!r}".encode())
        else:
            raise TypeError(f"checkpoint payload holds a {type(node).__name__}; only tensors, arrays, containers "
                            "and plain values can be checksummed")

    walk(obj)
    return hasher.hexdigest()


# A write that fails for one of these is the machine's state, not a bug: said in one line, with the path.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: the last good checkpoint is never lost. The
    payload is stored with its contents' digest (`sha256`), which a load verifies.
    """
    payload = {**payload, DIGEST_KEY: contents_digest(payload)}
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp makes the file private (0600); a checkpoint gets the mode of any other file the
        # user writes (0644 or 0640 under the usual umasks), so a labmate can load it.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if error.errno not in STORAGE_ERRNOS:
            raise
        kept = f"{path} still holds the previous checkpoint" if path.exists() else f"{path} was not written"
        raise OSError(error.errno, f"cannot write checkpoint {path}: {os.strerror(error.errno)} "
                      f"({errno.errorcode[error.errno]}); {kept}") from error
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def link_atomic(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (a hard link, renamed into place atomically): the same
    state saved under two names is written once. Where the file system has no hard links, a copy."""
    temporary = target.with_name(f"{target.name}.{os.getpid()}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load and validate a checkpoint written by this codebase for the same experiment."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: nothing to resume (run without resume=true)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a torch file ({type(error).__name__}: {error}); "
                           "delete it or point run_dir at a run with a valid checkpoint") from error
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is not an ssl-imwa checkpoint: expected keys {list(REQUIRED_KEYS)}, "
                           f"found {found}")
    if payload["format_version"] not in READABLE_VERSIONS:
        raise RuntimeError(f"checkpoint {path} has format version {payload['format_version']}, "
                           f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if payload["format_version"] >= 2:
        stored = payload.pop(DIGEST_KEY, None)
        if stored != contents_digest(payload):
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its contents do not match the digest written "
                                    "with it (damaged on disk or in transfer)")
    saved = {**KEYS_ADDED_LATER, **payload["fingerprint"]}
    mismatched = [
        f"{key}: checkpoint has {saved.get(key)!r}, config has {value!r}"
        for key, value in fingerprint.items() if saved.get(key) != value
    ]
    if mismatched:
        raise RuntimeError(f"checkpoint {path} was written by a different experiment; resume needs the same "
                           "settings:\n  " + "\n  ".join(mismatched))
    return payload


def replica_tensors(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every replica's student, teacher and optimiser tensors, flattened by name
    (`<replica>.<part>.<key>`): what a bitwise comparison of two runs compares."""
    flat: dict[str, torch.Tensor] = {}
    for index, replica in enumerate(payload["replicas"]):
        for part in ("model", "teacher"):
            for key, value in replica[part].items():
                flat[f"{index}.{part}.{key}"] = value
        for param, entry in replica["optimizer"]["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    flat[f"{index}.optimizer.{param}.{key}"] = value
    return flat
