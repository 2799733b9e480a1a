"""Recipes: named functions returning a full RunConfig; variants change a field, not add a flag."""

from __future__ import annotations

import dataclasses

from mmcore.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig,
                           TaskConfig)


def debug(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest model, a few steps, two workers (tests)."""
    return RunConfig(
        recipe="debug", model=ModelConfig("clip-debug"), task=TaskConfig(loss="clip"),
        data=DataConfig(dataset=dataset, batch_size=32, val_batches=2),
        optim=OptimConfig(lr=2e-3, warmup_steps=2, max_steps=20),
        parallel=ParallelConfig(num_workers=2, zero_stage=2),
        checkpoint=CheckpointConfig(every_steps=10),
    )


def demo(dataset: str) -> RunConfig:
    """A few minutes on 2 CPU cores: learns the sample corpus well above chance.

    No crop augmentation: the synthetic captions state exact counts and positions, which a crop
    can cut off, and 300 steps are too few for augmentation to pay for itself."""
    return RunConfig(
        recipe="demo", model=ModelConfig("clip-demo"), task=TaskConfig(loss="clip"),
        data=DataConfig(dataset=dataset, batch_size=128, val_batches=4, augment=False),
        optim=OptimConfig(lr=1e-3, warmup_steps=30, max_steps=300),
        parallel=ParallelConfig(num_workers=2, zero_stage=2),
        checkpoint=CheckpointConfig(every_steps=100),
    )


def demo_siglip(dataset: str) -> RunConfig:
    """The demo with the sigmoid loss (SigLIP)."""
    cfg = demo(dataset)
    return dataclasses.replace(cfg, recipe="demo-siglip", task=TaskConfig(loss="siglip"))


def gpu_base(dataset: str) -> RunConfig:
    """ViT-B/16 on GPUs: bf16, ZeRO-2, one worker per GPU (set parallel.num_workers to the GPU count)."""
    return RunConfig(
        recipe="gpu-base", model=ModelConfig("clip-vit-b16"), task=TaskConfig(loss="clip"),
        data=DataConfig(dataset=dataset, batch_size=256, val_batches=8),
        optim=OptimConfig(lr=5e-4, weight_decay=0.2, warmup_steps=500, max_steps=10000),
        parallel=ParallelConfig(num_workers=1, use_gpu=True, zero_stage=2, precision="bf16"),
        checkpoint=CheckpointConfig(every_steps=1000),
    )


RECIPES = {"debug": debug, "demo": demo, "demo-siglip": demo_siglip, "gpu-base": gpu_base}


def recipe(name: str, dataset: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name](dataset)
