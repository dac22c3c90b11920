"""Replica placement over processes, each process's device, and the collectives a merge needs.

W processes form G = W / D replica groups of D data-parallel processes each (`imwa.data_parallel=D`,
default 1): process r is data-parallel rank r mod D of group r // D. The G groups hold the K
replicas (replica k in group k mod G, K a multiple of G); the D processes of a group train the
same replicas on slices of each step's batch. With W = 1 every collective is the identity and all
replicas are time-sliced on one device. Launch W > 1 with `torchrun --nproc_per_node=W main.py ...`:
gloo on CPU, NCCL on GPU, one GPU per process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map_only


def world_size_from_environment() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_environment() -> int:
    return int(os.environ.get("RANK", "0"))


def process_device(requested: str, world_size: int, local_rank: int, visible_gpus: int) -> torch.device:
    """The device this process trains on.

    One process: the requested device. W > 1 on GPUs: `device=cuda` and process LOCAL_RANK takes
    GPU LOCAL_RANK mod (GPUs it can see), which is GPU 0 where a scheduler shows each task only
    its own GPU. Naming one GPU (`cuda:N`) with W > 1 would put every process on it: refused.
    """
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if visible_gpus < 1:
        raise RuntimeError(f"device='{requested}' but CUDA is not available on this machine; use device=cpu")
    if world_size == 1:
        return device if device.index is not None else torch.device("cuda", 0)
    if device.index is not None:
        raise ValueError(f"device='{requested}' with {world_size} processes: every process would use that one "
                         f"GPU. Use device=cuda: process LOCAL_RANK then takes GPU LOCAL_RANK mod the GPUs it sees "
                         "(restrict them with CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank % visible_gpus)


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor inside dicts, lists and tuples moved to `device` (others left alone)."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device), obj)


class Communicator:
    """One process group as the engine sees it; a single process needs no group at all.

    `rank` and `world_size` are within `group` (None: the default group of all processes);
    `src` and `dst` arguments are ranks within the group too.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, timeout_s: float = 0.0,
                 device: torch.device | None = None, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.device = device or torch.device("cpu")
        self.group = group

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_replicas(self, k: int) -> list[int]:
        """Replica indices this process holds: k mod W == rank."""
        if k % self.world_size:
            raise ValueError(f"imwa.k={k} is not a multiple of the number of processes ({self.world_size}): "
                             "every process must hold the same number of replicas, or the others would wait a "
                             "whole replica-episode at each merge and time out. Use imwa.k="
                             f"{max(self.world_size, k - k % self.world_size)} or "
                             f"{k + self.world_size - k % self.world_size}, or another --nproc_per_node")
        return [index for index in range(k) if index % self.world_size == self.rank]

    def _guard(self, what: str, call: Any) -> Any:
        try:
            return call()
        except (RuntimeError, dist.DistError) as error:
            raise RuntimeError(
                f"process {self.rank}/{self.world_size}: {what} failed: another replica process died or did not "
                f"answer within imwa.timeout_s={self.timeout_s:g} s ({type(error).__name__}: {error})") from error

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> None:
        if self.world_size > 1:
            self._guard(what, lambda: dist.all_reduce(tensor, dist.ReduceOp.SUM, group=self.group))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the group's processes (a new tensor; the input is untouched)."""
        total = tensor.clone()
        self.all_reduce_sum_(total, "sum over the data-parallel group")
        return total

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (same shape everywhere) concatenated along dim 0 in rank order:
        with slices of one batch, the whole batch in its order."""
        if self.world_size == 1:
            return tensor
        if tensor.dtype == torch.bool:   # not every backend reduces bool
            return self.gather(tensor.to(torch.uint8)).bool()
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._guard("gather over the data-parallel group",
                    lambda: dist.all_gather(pieces, tensor.contiguous(), group=self.group))
        return torch.cat(pieces)

    def broadcast_(self, tensors: list[torch.Tensor], what: str, src: int = 0) -> None:
        """Overwrite `tensors` everywhere with process `src`'s values (one flat message per dtype)."""
        if self.world_size == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for same_dtype in by_dtype.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in same_dtype])
            self._guard(what, lambda flat=flat: dist.broadcast(flat, self._global(src), group=self.group))
            pieces = flat.split([tensor.numel() for tensor in same_dtype])
            torch._foreach_copy_(same_dtype, [piece.view_as(tensor) for piece, tensor in zip(pieces, same_dtype)])

    # Objects travel pickled, and a pickled CUDA tensor is rebuilt on the sender's GPU: tensors
    # go as CPU tensors and come back on this process's device.
    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        self._guard(what, lambda: dist.all_gather_object(gathered, to_device(obj, torch.device("cpu")),
                                                         group=self.group))
        return [to_device(item, self.device) for item in gathered]

    def gather_object(self, obj: Any, what: str, dst: int = 0) -> list[Any] | None:
        """Every process's `obj` on process `dst` (None elsewhere): for data only one process uses."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._guard(what, lambda: dist.gather_object(to_device(obj, torch.device("cpu")), gathered,
                                                     self._global(dst), group=self.group))
        return None if gathered is None else [to_device(item, self.device) for item in gathered]

    def broadcast_object(self, obj: Any, what: str, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [to_device(obj, torch.device("cpu"))]
        self._guard(what, lambda: dist.broadcast_object_list(box, self._global(src), group=self.group))
        return to_device(box[0], self.device)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class ProcessLayout:
    """The three groups a process belongs to.

    world: every process (run directory, launch checks). across_replicas: the G processes with
    this process's data-parallel rank, one per replica group; merges and the resume agreement run
    there, so all D data-parallel ranks merge at once. data_parallel: the D processes of this
    replica group, which share each step's batch (DDP, SyncBatchNorm, algorithm reductions).
    """

    world: Communicator
    across_replicas: Communicator
    data_parallel: Communicator


def init_process_layout(device: torch.device, timeout_s: float, data_parallel: int = 1) -> ProcessLayout:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK), if any, and
    split it into replica groups of `data_parallel` processes (a device mesh: replica x dp).

    `device` is this process's device from `process_device`; on a GPU it must already be the
    current device (set before anything is allocated), and NCCL is bound to it.
    """
    world_size = world_size_from_environment()
    if world_size % data_parallel:
        raise ValueError(f"imwa.data_parallel={data_parallel} does not divide the {world_size} process(es): every "
                         f"replica group needs {data_parallel} processes; launch a multiple of {data_parallel} "
                         "(torchrun --nproc_per_node=... x --nnodes=...)")
    if world_size == 1:
        single = Communicator(timeout_s=timeout_s, device=device)
        return ProcessLayout(single, single, single)
    rank = rank_from_environment()
    if not dist.is_initialized():
        options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **options)
    world = Communicator(rank, world_size, timeout_s, device)
    if data_parallel == 1:
        return ProcessLayout(world, world, Communicator(timeout_s=timeout_s, device=device))
    from torch.distributed.device_mesh import init_device_mesh

    groups = world_size // data_parallel
    mesh = init_device_mesh(device.type, (groups, data_parallel), mesh_dim_names=("replica", "dp"))
    across = Communicator(rank // data_parallel, groups, timeout_s, device, mesh.get_group("replica"))
    within = Communicator(rank % data_parallel, data_parallel, timeout_s, device, mesh.get_group("dp"))
    return ProcessLayout(world, across, within)


def average_across(local_states: list[dict[str, torch.Tensor]], total: int, comm: Communicator | None = None,
                   what: str = "average") -> dict[str, torch.Tensor]:
    """Mean over all `total` replicas of the given state dicts, wherever they live.

    Floating tensors: local sum, one flat all-reduce (sum), divide by K. Integer tensors: copied
    from replica 0, which process 0 holds. Without a communicator (or with one process) this is
    the plain sum / K of the given states.
    """
    first = local_states[0]
    float_keys = [key for key, value in first.items() if value.is_floating_point()]
    sums = {key: first[key].detach().clone() for key in float_keys}
    for state in local_states[1:]:
        for key in float_keys:
            sums[key].add_(state[key])
    if comm is not None and comm.world_size > 1 and float_keys:
        flat = torch.cat([sums[key].reshape(-1) for key in float_keys])  # promotes mixed float dtypes
        comm.all_reduce_sum_(flat, what)
        offset = 0
        for key in float_keys:
            count = sums[key].numel()
            sums[key] = flat[offset:offset + count].view_as(sums[key]).to(sums[key].dtype, copy=True)
            offset += count
    integers = {key: value.clone() for key, value in first.items() if key not in sums}
    if comm is not None:
        integers = comm.broadcast_object(integers, what)
    return {key: sums[key].div_(total) if key in sums else integers[key] for key in first}
