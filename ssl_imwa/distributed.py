"""Replica placement over processes and the collectives a merge needs.

W processes hold K replicas (replica k on process k mod W). With W = 1 every collective is the
identity and all replicas are time-sliced on one device. Launch W > 1 with
`torchrun --nproc_per_node=W main.py ...`: gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


class Communicator:
    """The process group as the orchestrator sees it; a single process needs no group at all."""

    def __init__(self, rank: int = 0, world_size: int = 1, timeout_s: float = 0.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_replicas(self, k: int) -> list[int]:
        """Replica indices this process holds: k mod W == rank."""
        if k < self.world_size:
            raise ValueError(f"imwa.k={k} is smaller than the number of processes ({self.world_size}): "
                             "every process must hold at least one replica")
        return [index for index in range(k) if index % self.world_size == self.rank]

    def _guard(self, what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except (RuntimeError, dist.DistError) as error:
            raise RuntimeError(
                f"process {self.rank}/{self.world_size}: {what} failed: another replica process died or did not "
                f"answer within imwa.timeout_s={self.timeout_s:g} s ({type(error).__name__}: {error})") from error

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> None:
        if self.world_size > 1:
            self._guard(what, dist.all_reduce, tensor, dist.ReduceOp.SUM)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        self._guard(what, dist.all_gather_object, gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, what: str, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        self._guard(what, dist.broadcast_object_list, box, src)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_communicator(device: torch.device, timeout_s: float) -> Communicator:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Communicator(timeout_s=timeout_s)
    rank = int(os.environ["RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Communicator(rank, world_size, timeout_s)


def average_across(local_states: list[dict[str, torch.Tensor]], total: int, comm: Communicator, what: str
                   ) -> dict[str, torch.Tensor]:
    """Mean over all `total` replicas of the given state dicts, wherever they live.

    Floating tensors: local sum, one flat all-reduce (sum), divide by K. Integer tensors: copied
    from replica 0, which process 0 holds. With one process this is the plain sum / K.
    """
    first = local_states[0]
    float_keys = [key for key, value in first.items() if value.is_floating_point()]
    sums = {key: first[key].detach().clone() for key in float_keys}
    for state in local_states[1:]:
        for key in float_keys:
            sums[key].add_(state[key])
    if comm.world_size > 1 and float_keys:
        flat = torch.cat([sums[key].reshape(-1) for key in float_keys])  # promotes mixed float dtypes
        comm.all_reduce_sum_(flat, what)
        offset = 0
        for key in float_keys:
            count = sums[key].numel()
            sums[key] = flat[offset:offset + count].view_as(sums[key]).to(sums[key].dtype, copy=True)
            offset += count
    integers = {key: value.clone() for key, value in first.items() if key not in sums}
    integers = comm.broadcast_object(integers, what)
    return {key: sums[key].div_(total) if key in sums else integers[key] for key in first}
