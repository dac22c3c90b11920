"""Checkpoints: atomic writes (temp file + rename) and validated loads with clear errors.

A checkpoint holds only what torch's weights-only unpickler accepts (tensors, dicts, lists, tuples,
strings, numbers, booleans, None) and is only ever read by that unpickler: opening a run someone
sent you cannot run their code. `save_atomic` refuses any other value before writing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Version 3: weights-only (no NumPy arrays or other pickled objects). Files of versions 1 and 2 are
# refused by the weights-only loader; `python -m ssl_imwa.upgrade_checkpoint` converts trusted ones.
FORMAT_VERSION = 3
REQUIRED_KEYS = ("format_version", "fingerprint", "progress", "replicas", "run_state")
DIGEST_KEY = "sha256"
UPGRADE_COMMAND = "python -m ssl_imwa.upgrade_checkpoint --trust"
PLAIN_VALUE_TYPES = (str, bool, int, float, type(None))
# What torch's weights-only unpickler says when a file asks for an object or a call it does not allow
# (torch/_weights_only_unpickler.py); any other refusal (an unknown opcode: random bytes) is damage.
OBJECT_REFUSALS = re.compile(r"GLOBAL |call reduce for|Can only (create new object|build)|persistent_load")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not ours)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint holding an object the weights-only unpickler refuses: never loaded, never skipped
    over for an older checkpoint (a file that may carry someone's code deserves a person's look)."""


def contents_digest(obj: Any, other_leaf: Callable[[Any], bytes | None] | None = None) -> str:
    """The SHA-256 of `obj`'s contents: values, dtypes, shapes and structure.

    torch's zip format carries no checksum a load verifies: a flipped byte inside a tensor loads
    silently as a different weight. The digest, stored in the file and recomputed after loading,
    catches that and any damage that still unpickles. Container classes are not hashed (a
    state_dict's OrderedDict is one mapping like any other). Only the types a weights-only load
    accepts are allowed, so a payload that could not be loaded safely is refused before it is written
    (`other_leaf` hashes further types, for reading files of earlier formats: ssl_imwa.upgrade_checkpoint).
    """
    hasher = hashlib.sha256()

    def walk(node: Any) -> None:
        if type(node) in (dict, OrderedDict):
            hasher.update(f"map{len(node)}".encode())
            for key, value in node.items():
                walk(key)
                walk(value)
        elif type(node) in (list, tuple):
            hasher.update(f"seq{len(node)}".encode())
            for item in node:
                walk(item)
        elif isinstance(node, torch.Tensor):
            flat = node.detach().cpu().contiguous().reshape(-1)
            hasher.update(f"tensor{node.dtype}{tuple(node.shape)}".encode())
            hasher.update(flat.view(torch.uint8).numpy())
        elif type(node) in PLAIN_VALUE_TYPES:
            hasher.update(f"{type(node).__name__}{node!r}".encode())
        elif other_leaf is not None and (encoded := other_leaf(node)) is not None:
            hasher.update(encoded)
        else:
            raise TypeError(f"checkpoint payload holds a {type(node).__module__}.{type(node).__qualname__}; a "
                            "checkpoint holds only tensors, dicts, lists, tuples, strings, numbers, booleans and "
                            "None (what torch.load(weights_only=True) reads): convert it when saving")

    walk(obj)
    return hasher.hexdigest()


# A write that fails for one of these is the machine's state, not a bug: said in one line, with the path.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def storage_fault(error: BaseException) -> OSError | None:
    """The storage error (no space, read-only, ...) behind `error`, if one is: torch's zip writer
    reports a failed write of the stream as `RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos`, with the OSError only in the exception's context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: the last good checkpoint is never lost. The
    payload is stored with its contents' digest (`sha256`), which a load verifies, and its tensors
    packed into a few storages (`pack_storages`, one call per replica's part).
    """
    digest = contents_digest(payload)
    rest = pack_storages({key: value for key, value in payload.items() if key != "replicas"})
    payload = {key: [{part: pack_storages(state) for part, state in replica.items()} for replica in value]
               if key == "replicas" else rest[key] for key, value in payload.items()}
    payload[DIGEST_KEY] = digest
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
    except (OSError, RuntimeError) as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        fault = storage_fault(error)
        if fault is None:
            raise
        kept = f"{path} still holds the previous checkpoint" if path.exists() else f"{path} was not written"
        raise OSError(fault.errno, f"cannot write checkpoint {path}: {os.strerror(fault.errno)} "
                      f"({errno.errorcode[fault.errno]}); {kept}") from error
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def _map_tensors(node: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`node` with every tensor in it replaced by `change(tensor)`; containers keep their types."""
    if type(node) in (dict, OrderedDict):
        return type(node)((key, _map_tensors(value, change)) for key, value in node.items())
    if type(node) in (list, tuple):
        return type(node)(_map_tensors(item, change) for item in node)
    return change(node) if isinstance(node, torch.Tensor) else node


def pack_storages(payload: Any) -> Any:
    """`payload` with its tensors (but bytes) copied into one CPU storage per dtype, each a view of it.

    torch's weights-only unpickler is written in Python and pays for every storage it rebuilds: a
    state_dict of hundreds of small tensors loads about 1.7x slower than with the full unpickler.
    One storage per dtype makes the weights-only load as fast as the full one was
    (bench/checkpoint_load.py, docs/performance.md); the values, shapes and dtypes saved are the same.
    A loaded tensor is a view of its storage, and whoever keeps it (a restored optimizer keeps its
    momentum buffers) keeps the whole storage alive: so save_atomic packs each part of a replica
    (student, teacher, optimizer, algorithm state) on its own, never one part with another.
    uint8 tensors stay as they are: they are RNG states, and torch.Generator.set_state reads one from
    the start of its storage whatever the view's offset, so a packed state would restore the wrong
    generator.
    """
    tensors: list[torch.Tensor] = []
    _map_tensors(payload, lambda tensor: tensors.append(tensor) or tensor)
    dense = [tensor for tensor in tensors if tensor.layout == torch.strided and tensor.dtype != torch.uint8]
    buffers: dict[torch.dtype, torch.Tensor] = {}
    for dtype in {tensor.dtype for tensor in dense}:
        buffers[dtype] = torch.empty(sum(tensor.numel() for tensor in dense if tensor.dtype == dtype), dtype=dtype)
    views: dict[int, torch.Tensor] = {}
    offsets = dict.fromkeys(buffers, 0)
    for tensor in dense:
        if id(tensor) in views:
            continue
        start, offsets[tensor.dtype] = offsets[tensor.dtype], offsets[tensor.dtype] + tensor.numel()
        view = buffers[tensor.dtype][start:offsets[tensor.dtype]].view(tensor.shape)
        views[id(tensor)] = view.copy_(tensor.detach())
    return _map_tensors(payload, lambda tensor: views.get(id(tensor), tensor))


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


def read_weights_only(path: Path) -> Any:
    """`path` unpickled by torch's weights-only loader; a refused type is named in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not OBJECT_REFUSALS.search(str(error)):   # garbage bytes, a truncated pickle: damage, not code
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a torch file (UnpicklingError: "
                                    f"{_weights_only_reason(str(error))}); delete it or point run_dir at a run with "
                                    "a valid checkpoint") from None
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = refused.group(1) if refused else _weights_only_reason(str(error))
        raise UnsafeCheckpoint(
            f"checkpoint {path} refused: it holds {what}, which torch's weights-only loader does not load (unpickling "
            "it could run code); ssl-imwa checkpoints hold only tensors and plain values. One written by ssl-imwa "
            f"before checkpoint format 3 can be converted once, if you trust where it came from: {UPGRADE_COMMAND} "
            f"{path}") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a torch file ({type(error).__name__}: {error}); "
                                "delete it or point run_dir at a run with a valid checkpoint") from error


def _weights_only_reason(message: str) -> str:
    """The unpickler's own words, one line, without torch's advice around them."""
    detail = message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load", 1)[0]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0] if lines else "an object it does not allow"


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load (weights only) and validate a checkpoint written by this codebase for the same experiment."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: nothing to resume (run without resume=true)")
    payload = read_weights_only(path)
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is not an ssl-imwa checkpoint: expected keys {list(REQUIRED_KEYS)}, "
                           f"found {found}")
    if payload["format_version"] != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format version {payload['format_version']}, this code reads "
                           f"version {FORMAT_VERSION}" + (f" (convert a trusted older file with {UPGRADE_COMMAND} "
                                                          f"{path})" if payload["format_version"] < FORMAT_VERSION
                                                          else " (written by a newer ssl-imwa)"))
    stored = payload.pop(DIGEST_KEY, None)
    if stored != contents_digest(payload):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its contents do not match the digest written "
                                "with it (damaged on disk or in transfer)")
    saved = payload["fingerprint"]
    mismatched = [
        f"{key}: checkpoint has {saved.get(key)!r}, config has {value!r}"
        for key, value in fingerprint.items() if saved.get(key) != value
    ]
    if mismatched:  # one line, naming the keys (the first four)
        more = f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        raise RuntimeError(f"checkpoint {path} was written by a different experiment ({'; '.join(mismatched[:4])}"
                           f"{more}): a resume needs the run's own settings; start a new run to change them")
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
