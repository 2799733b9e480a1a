"""The collective operations the trainer and the checkpoint store use: torch.distributed, or one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ranks:
    """This process's place among the training ranks. Without an initialized process group (one process,
    no torchrun) every operation is the one-rank answer; tests may pass a fake with the same methods."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (other ranks pass anything)."""
        box = [obj]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not dist.is_initialized():
            return [obj]
        every = [None] * self.world
        dist.all_gather_object(every, obj)
        return every

    def all_true(self, flag: bool) -> bool:
        """The same answer on every rank (a step is skipped everywhere or nowhere)."""
        value = torch.tensor([0.0 if flag else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item() == 0.0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks."""
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], device=self.device, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(tensor)
            tensor /= self.world
        return dict(zip(keys, tensor.tolist()))
