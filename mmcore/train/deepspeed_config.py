"""The DeepSpeed config, built from the typed RunConfig (never written by hand), and the engine a
training worker starts from it."""

from __future__ import annotations

from mmcore.config import RunConfig


def resolve_precision(precision: str, cuda: bool, bf16_supported: bool) -> str:
    """auto -> bf16 on CUDA GPUs with bf16, else fp32 (fp16 is not offered: it fails on CPU)."""
    if precision == "auto":
        return "bf16" if cuda and bf16_supported else "fp32"
    if precision == "bf16" and cuda and not bf16_supported:
        raise ValueError("parallel.precision: bf16 asked for, but this GPU does not support it")
    return precision


def build_ds_config(cfg: RunConfig, precision: str) -> dict:
    """DeepSpeed's JSON config: batch sizes, ZeRO stage and offload, precision, AdamW, warmup + cosine."""
    p, o = cfg.parallel, cfg.optim
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if p.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       # torch's AdamW: no C++ op to JIT-build (DeepSpeed's CPU Adam needs one when offloading)
                       "torch_adam": not p.offload_optimizer, **({"fused": True} if o.fused else {})},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            # DeepSpeed refuses 0 warmup steps; one step from lr 0 is the nearest thing to none.
            "params": {"total_num_steps": o.max_steps, "warmup_num_steps": max(o.warmup_steps, 1),
                       "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
                       "warmup_type": "linear"},  # DeepSpeed's default is log-shaped
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def initialize(task, cfg: RunConfig, cuda: bool):
    """DeepSpeed around a Task as a training worker starts it: the precision resolve_precision picks for
    the device, AdamW over param_groups (frozen parameters left out; the Task's `learning_rates` in groups of
    their own), build_ds_config; compiled if parallel.compile.
    -> (engine, precision, the dtype cast_floating gives the engine's inputs)."""
    import deepspeed
    import torch

    from mmcore.train.parallel import param_groups

    precision = resolve_precision(cfg.parallel.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    lrs = task.learning_rates(cfg.optim) if hasattr(task, "learning_rates") else {}
    engine, *_ = deepspeed.initialize(model=task, model_parameters=param_groups(task, cfg.optim.weight_decay, lrs),
                                      config=build_ds_config(cfg, precision), dist_init_required=False)
    if cfg.parallel.compile:
        engine.compile()  # the accelerator's backend (inductor), ZeRO's hooks kept working
    return engine, precision, torch.bfloat16 if precision == "bf16" else torch.float32


def cast_floating(batch: dict, dtype) -> dict:
    """Floating tensors in the training dtype; the rest (token ids, uint8 pixels) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
