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


def param_groups(module: nn.Module, weight_decay: float, lrs: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings' positions or scalars, nor on the new
    rows of a frozen table (decay would pull them away from rows that never move). `lrs`: parameter name -> its
    own learning rate (in groups of their own; the rest take the optimizer's)."""
    groups: dict[tuple[bool, float | None], list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim >= 2 and "pos" not in name.split(".")[-1] and "new_rows" not in name.split(".")
        groups.setdefault((decays, (lrs or {}).get(name)), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, **({"lr": lr} if lr else {})}
            for (decays, lr), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1] or 0))]
