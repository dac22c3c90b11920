"""Convert checkpoints of earlier formats into the current one (formats 1 and 2 hold NumPy arrays;
format 3 holds its tensors as leaves of the payload, slow to read weights-only).

    python -m ssl_imwa.upgrade_checkpoint --trust RUN_DIR_OR_FILE [...]

The one place this project unpickles a file with torch's full (unsafe) unpickler: only for the files
named on the command line, and only with `--trust`, because unpickling them can run any code they
carry. Each converted file keeps its original beside it (`<name>.format<N>`), is checked against the
digest written with it (formats 2 and 3), and is then rewritten atomically in the current format,
which every other load reads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_imwa.checkpoint import (
    DIGEST_KEY,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    CorruptCheckpoint,
    contents_digest,
    save_atomic,
)
from ssl_imwa.rng import numpy_state_as_plain_data
from ssl_imwa.user_errors import short_user_errors

# Config keys that format-1 and -2 checkpoints may lack, with the value they were trained with.
KEYS_ADDED_LATER = {"imwa.data_parallel": 1, "model.sync_batchnorm": False}


def _numpy_leaf(node: Any) -> bytes | None:
    """How format 2 hashed NumPy values (its digest covered them as they were written)."""
    if isinstance(node, np.ndarray):
        return (f"array{node.dtype}{node.shape}".encode()
                + np.ascontiguousarray(node).reshape(-1).view(np.uint8).tobytes())
    if isinstance(node, np.generic):
        return f"{type(node).__name__}{node!r}".encode()
    return None


def upgrade(path: Path) -> int:
    """Rewrite the trusted checkpoint `path` in the current format; returns the version it had."""
    payload = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user's --trust
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CorruptCheckpoint(f"{path} is not an ssl-imwa checkpoint (expected keys {list(REQUIRED_KEYS)})")
    version = payload["format_version"]
    if version == FORMAT_VERSION:
        return version
    if version not in (1, 2, 3):
        raise ValueError(f"{path} has checkpoint format {version}; this converter reads formats 1 to 3")
    stored = payload.pop(DIGEST_KEY, None)
    if version >= 2 and stored != contents_digest(payload, other_leaf=_numpy_leaf):
        raise CorruptCheckpoint(f"{path} is corrupt: its contents do not match the digest written with it")
    rng = payload["run_state"]["rng"]
    if version < 3:
        rng["numpy"] = numpy_state_as_plain_data(rng["numpy"])
    for key, value in KEYS_ADDED_LATER.items():
        payload["fingerprint"].setdefault(key, value)
    payload["format_version"] = FORMAT_VERSION
    shutil.copy2(path, path.with_name(f"{path.name}.format{version}"))
    save_atomic(payload, path)
    return version


def checkpoints_named(target: Path) -> list[Path]:
    """`target` itself, or every checkpoint in a run directory's checkpoints/."""
    if target.is_file():
        return [target]
    folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    found = sorted(folder.glob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{target} is neither a checkpoint file nor a run directory holding checkpoints/*.pt")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", type=Path, nargs="+", help="checkpoint files or run directories")
    parser.add_argument("--trust", action="store_true",
                        help="required: you trust these files (unpickling them can run any code they carry)")
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error("converting unpickles the files with torch's full unpickler, which runs any code they carry: "
                     "pass --trust only for files whose source you trust")
    with short_user_errors():
        for target in args.targets:
            for path in checkpoints_named(target):
                version = upgrade(path)
                said = "already in format" if version == FORMAT_VERSION else f"format {version} converted to format"
                print(f"{path}: {said} {FORMAT_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
