"""Distribution applied from outside the model: activation checkpointing, optimizer param groups, threads."""

from __future__ import annotations

import os

from torch import nn

from mmcore.config import ParallelConfig
from mmcore.models.transformer import Block


def apply_activation_checkpointing(module: nn.Module) -> None:
    """Recompute every transformer Block in the backward pass (non-reentrant, ZeRO-safe)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing as apply, checkpoint_wrapper)

    apply(module, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
          check_fn=lambda m: isinstance(m, Block))


def worker_threads(parallel: ParallelConfig, local_workers: int) -> int:
    """torch CPU threads of one training worker: parallel.threads_per_worker, or the node's cores
    shared by the workers on it (Ray sets OMP_NUM_THREADS to a worker's 1 logical CPU)."""
    return parallel.threads_per_worker or max(1, (os.cpu_count() or 1) // local_workers)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings' positions or scalars."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "pos" not in name.split(".")[-1] else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
