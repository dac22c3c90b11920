"""Checkpoints: atomic writes (temp file + rename) and validated loads with clear errors.

A checkpoint holds only what torch's weights-only unpickler accepts (tensors, dicts, lists, tuples,
strings, numbers, booleans, None) and is only ever read by that unpickler: opening a run someone
sent you cannot run their code. `save_atomic` refuses any other value before writing.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Version 4: weights-only, tensors in the flat layout of `pack_tensors`. Files of versions 1 and 2 hold
# NumPy arrays (refused by the weights-only loader), version 3 the tensors as leaves of the payload;
# `python -m ssl_imwa.upgrade_checkpoint` converts trusted ones.
FORMAT_VERSION = 4
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
    payload is stored in the flat layout of `pack_tensors`, with the digest (`sha256`) of what is
    stored, which every read verifies; computing it refuses, before anything is written, a value that
    a weights-only load could not read.
    """
    stored = {"format_version": payload.get("format_version"), **pack_tensors(payload)}
    stored[DIGEST_KEY] = contents_digest(stored)
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            torch.save(stored, stream)
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


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every leaf of `node` (what is not a dict, list or tuple) with its path of keys, in a fixed order."""
    if type(node) in (dict, OrderedDict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif type(node) in (list, tuple):
        for index, item in enumerate(node):
            yield from _leaves(item, (*path, index))
    else:
        yield path, node


def _map_leaves(node: Any, change: Callable[[Any], Any]) -> Any:
    """`node` with every leaf replaced by `change(leaf)`, visited in `_leaves`' order; containers keep their types."""
    if type(node) in (dict, OrderedDict):
        return type(node)((key, _map_leaves(value, change)) for key, value in node.items())
    if type(node) in (list, tuple):
        return type(node)(_map_leaves(item, change) for item in node)
    return change(node)


def _packable(leaf: Any) -> bool:
    # uint8 tensors are RNG states: torch.Generator.set_state reads one from the start of its storage
    # whatever the view's offset, so they stay tensors of their own.
    return isinstance(leaf, torch.Tensor) and leaf.dtype != torch.uint8


def pack_tensors(payload: Any) -> dict[str, Any]:
    """`payload` in the flat layout a checkpoint file holds: its tensors' values in a few 1-D buffers,
    their shapes in one tensor, and the payload's structure with a None where each tensor was.

    torch's weights-only unpickler is written in Python and pays for every tensor it rebuilds (about
    twenty opcodes and a call each): a checkpoint of ~800 tensors loaded 40% slower with it than with
    the full unpickler. In this layout the unpickler rebuilds a handful of tensors and `unpack_tensors`
    cuts the views in a loop of its own, so a load is faster than the full unpickler was
    (bench/checkpoint_load.py, docs/performance.md). A loaded tensor is a view of its buffer, and
    whoever keeps one (a restored optimizer keeps its momentum) keeps the buffer alive: so tensors share
    a buffer only within one container three keys deep (one replica's student, teacher, optimizer or
    algorithm state), never across them.
    """
    buffer_index: dict[tuple[Any, ...], int] = {}
    parts: list[list[torch.Tensor]] = []
    is_tensor, shapes, buffer_of = [], [], []
    for path, leaf in _leaves(payload):
        is_tensor.append(_packable(leaf))
        if not is_tensor[-1]:
            continue
        group = (*path[:3], str(leaf.dtype))
        if group not in buffer_index:
            buffer_index[group] = len(parts)
            parts.append([])
        parts[buffer_index[group]].append(leaf.detach().reshape(-1))
        buffer_of.append(buffer_index[group])
        shapes += [leaf.dim(), *leaf.shape]
    return {"tree": _map_leaves(payload, lambda leaf: None if _packable(leaf) else leaf),
            "tensors": {"is_tensor": torch.tensor(is_tensor, dtype=torch.bool),
                        "shapes": torch.tensor(shapes, dtype=torch.int64),
                        "buffer_of": torch.tensor(buffer_of, dtype=torch.int64),
                        "buffers": [torch.cat(part).cpu() for part in parts]}}


def unpack_tensors(stored: dict[str, Any]) -> Any:
    """The payload `pack_tensors` flattened into `stored`, each tensor a view of its buffer."""
    table = stored["tensors"]
    is_tensor, shapes, buffer_of = (table[key].tolist() for key in ("is_tensor", "shapes", "buffer_of"))
    buffers = table["buffers"]
    offsets = [0] * len(buffers)
    leaf_index, tensor_index, shape_index = 0, 0, 0

    def rebuild(leaf: Any) -> Any:
        nonlocal leaf_index, tensor_index, shape_index
        packed, leaf_index = is_tensor[leaf_index], leaf_index + 1
        if not packed:
            return leaf
        ndim = shapes[shape_index]
        shape, shape_index = shapes[shape_index + 1:shape_index + 1 + ndim], shape_index + 1 + ndim
        buffer = buffer_of[tensor_index]
        tensor_index += 1
        start, offsets[buffer] = offsets[buffer], offsets[buffer] + math.prod(shape)
        return buffers[buffer][start:offsets[buffer]].view(shape)

    payload = _map_leaves(stored["tree"], rebuild)
    if leaf_index != len(is_tensor) or offsets != [len(buffer) for buffer in buffers]:
        raise ValueError("the tensor table does not match the payload's structure")
    return payload


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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload `save_atomic` wrote to `path`, read weights-only and checked against its digest."""
    stored = read_weights_only(path)
    if not isinstance(stored, dict) or "format_version" not in stored:
        found = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is not an ssl-imwa checkpoint: expected a format_version key, "
                                f"found {found}")
    if stored["format_version"] != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format version {stored['format_version']}, this code reads "
                           f"version {FORMAT_VERSION}" + (f" (convert a trusted older file with {UPGRADE_COMMAND} "
                                                          f"{path})" if stored["format_version"] < FORMAT_VERSION
                                                          else " (written by a newer ssl-imwa)"))
    digest = stored.pop(DIGEST_KEY, None)
    if digest != contents_digest(stored):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its contents do not match the digest written "
                                "with it (damaged on disk or in transfer)")
    try:
        payload = unpack_tensors(stored)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise CorruptCheckpoint(f"checkpoint {path} is not an ssl-imwa checkpoint: its tensors cannot be rebuilt "
                                f"({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is not an ssl-imwa checkpoint: expected keys {list(REQUIRED_KEYS)}, "
                                f"found {found}")
    return payload


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load (weights only) and validate a checkpoint written by this codebase for the same experiment."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: nothing to resume (run without resume=true)")
    payload = read_checkpoint(path)
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
