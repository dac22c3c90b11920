"""Count what would make the host wait for an accelerator, without one.

A CUDA step should never block the host: then the CPU prepares the next batch while the GPU
computes the current one. What blocks it is (1) a value read back to the host (`.item()`,
`float(t)`, `bool(t)`, `.tolist()`, `.cpu()`), (2) an op whose output size depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount` without a known size),
and (3) a host-to-device copy from pageable memory (it is staged synchronously). `SyncAudit`
is a `TorchDispatchMode` that sees every op of a step run on a stand-in device (`meta`, or fake
CUDA tensors) and records each of these with the line of our code that caused it. On a real GPU,
`torch.cuda.set_sync_debug_mode("warn")` is the ground truth (`bench/gpu_smoke/` uses it).

    with SyncAudit(torch.device("meta")) as audit:
        trainer.step(replica, step)
    audit.syncs, audit.copies_to_device
"""
from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]

# Ops whose output shape (or value on the host) depends on device data.
DATA_DEPENDENT = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.bincount.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.nonzero_static.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


def repository_frame(stack: list[traceback.FrameSummary], skip: tuple[Path, ...] = ()) -> str:
    """The innermost frame of this repository in `stack`, other than this file and `skip`: where an
    op came from, as `path:line`."""
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(ROOT) and path.name != "sync_audit.py" and path not in skip:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "<outside the repository>"


@dataclass
class Copy:
    nbytes: int
    non_blocking: bool
    pinned: bool
    where: str


@dataclass
class SyncAudit(TorchDispatchMode):
    """Records syncs and host-to-device copies of ops on `device` (a device type or a full device)."""

    device: torch.device
    # True: answer a data-dependent op on a stand-in device with a placeholder (0, or an empty
    # result) instead of raising, so that a step with syncs can still be counted to its end.
    tolerate: bool = False
    syncs: list[tuple[str, str]] = field(default_factory=list)          # (op, our source line)
    copies_to_device: list[Copy] = field(default_factory=list)
    ops: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def _on_device(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == self.device.type

    @staticmethod
    def _caller() -> str:
        return repository_frame(traceback.extract_stack())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        on_device = [tensor for tensor in tensors if self._on_device(tensor)]
        if on_device:
            self.ops += 1
        if func in DATA_DEPENDENT and on_device:
            self.syncs.append((str(func.overloadpacket.__name__), self._caller()))
            if self.tolerate and on_device[0].device.type == "meta":
                return self._placeholder(func, on_device[0], args, kwargs)
        elif func in INDEXING and on_device and any(
                tensor.dtype in (torch.bool, torch.uint8) for tensor in tensors[1:]
                if func is aten.index.Tensor or tensor is not tensors[-1]):
            self.syncs.append((f"{func.overloadpacket.__name__} with a boolean mask", self._caller()))
            if self.tolerate and on_device[0].device.type == "meta":
                return self._masked_placeholder(func, args)
        elif func is aten.lift_fresh.default and on_device:
            # torch.tensor(data, device=...): built on the host and copied, blocking, before we see it.
            self.copies_to_device.append(Copy(on_device[0].nbytes, False, False, self._caller()))
        elif func in COPIES:
            self._record_copy(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _placeholder(func: Any, tensor: torch.Tensor, args: Any, kwargs: dict[str, Any]) -> Any:
        if func is aten._local_scalar_dense.default:
            return False if tensor.dtype == torch.bool else (0.0 if tensor.is_floating_point() else 0)
        if func is aten.nonzero.default:
            return torch.empty(0, tensor.dim(), dtype=torch.long, device=tensor.device)
        if func is aten.bincount.default:
            return torch.zeros(kwargs.get("minlength", args[2] if len(args) > 2 else 0), dtype=torch.long,
                               device=tensor.device)
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    @staticmethod
    def _masked_placeholder(func: Any, args: Any) -> Any:
        """Boolean-mask indexing as if the mask selected nothing; a masked write as a no-op."""
        source, indices = args[0], args[1]
        if func is aten.index.Tensor:
            mask_dims = sum(1 if index is None else index.dim() for index in indices)
            return torch.empty(0, *source.shape[mask_dims:], dtype=source.dtype, device=source.device)
        return source

    def _record_copy(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if func is aten._to_copy.default:
            source = args[0]
            target_device = kwargs.get("device") or source.device
            non_blocking = bool(kwargs.get("non_blocking", False))
        else:
            target, source = args[0], args[1]
            target_device = target.device
            non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        target_device = torch.device(target_device)
        if source.device.type == "cpu" and target_device.type == self.device.type:
            pinned = bool(torch.cuda.is_available() and source.is_pinned())
            self.copies_to_device.append(Copy(source.nbytes, non_blocking, pinned, self._caller()))
        elif self._on_device(source) and target_device.type == "cpu":
            self.syncs.append(("copy to host", self._caller()))

    # ----- summaries ------------------------------------------------------------------------
    def sync_lines(self) -> Counter[str]:
        return Counter(f"{op} at {where}" for op, where in self.syncs)

    def summary(self) -> dict[str, Any]:
        return {
            "device_ops": self.ops,
            "syncs": len(self.syncs),
            "copies_to_device": len(self.copies_to_device),
            "blocking_copies": sum(not copy.non_blocking for copy in self.copies_to_device),
            "copied_bytes": sum(copy.nbytes for copy in self.copies_to_device),
            "sync_sources": dict(self.sync_lines()),
        }
