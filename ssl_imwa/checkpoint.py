"""Checkpoints: atomic writes (temp file + rename) and validated loads with clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "fingerprint", "progress", "replicas", "run_state")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not ours)."""


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: the last good checkpoint is never lost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    if payload["format_version"] != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format version {payload['format_version']}, "
                           f"this code reads version {FORMAT_VERSION}")
    mismatched = [
        f"{key}: checkpoint has {payload['fingerprint'].get(key)!r}, config has {value!r}"
        for key, value in fingerprint.items() if payload["fingerprint"].get(key) != value
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
