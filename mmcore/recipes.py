"""Recipes: named functions returning a full RunConfig, each from its stage's base; variants change a field,
not add a flag."""

from __future__ import annotations

import dataclasses

from mmcore.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig, TaskConfig
from mmcore.stages import STAGES


def base(stage: str, dataset: str, model: str, optim: OptimConfig, every: int, **data) -> RunConfig:
    """What a stage's recipes share: the stage's task with its first loss, its default parent
    (mmcore/stages.py), two workers with ZeRO-2, the dataset; `data` sets the rest of DataConfig."""
    record = STAGES[stage]
    return RunConfig(
        model=ModelConfig(model, parent=record.parent.default if record.parent else ""),
        task=TaskConfig(stage=stage, loss=record.losses[0]), data=DataConfig(dataset=dataset, **data), optim=optim,
        parallel=ParallelConfig(num_workers=2, zero_stage=2), checkpoint=CheckpointConfig(every_steps=every))


def named(name: str, cfg: RunConfig, **changes) -> RunConfig:
    """`cfg` as recipe `name`, with whole parts of it replaced."""
    return dataclasses.replace(cfg, recipe=name, **changes)


def debug(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest model, a few steps, two workers (tests)."""
    return named("debug", base("contrastive", dataset, "clip-debug", OptimConfig(lr=2e-3, warmup_steps=2, max_steps=20),
                               10, batch_size=32, val_batches=2))


def demo(dataset: str) -> RunConfig:
    """Minutes on 2 CPU cores: learns the sample corpus's colours, shapes, counts and digits.

    700 steps: the digits are learned late (at 450 steps zero-shot digits were still near chance in
    our trials, at 700 about 0.7), and 16-pixel patches, which train 2.3x faster, never told
    circles from squares. No crop augmentation: the synthetic captions state exact counts and
    positions, which a crop can cut off."""
    return named("demo", base("contrastive", dataset, "clip-demo", OptimConfig(lr=1e-3, warmup_steps=50, max_steps=700),
                              250, batch_size=128, val_batches=4, augment=False))


def quality(dataset: str) -> RunConfig:
    """The demo's model for 2,000 steps (at the demo's 260-275 samples/s on 2 cores, about 16 minutes
    of training; the limit the issue set is 30): how far this model goes on the sample corpus."""
    return named("quality", demo(dataset),
                 optim=OptimConfig(lr=1e-3, weight_decay=0.2, warmup_steps=100, max_steps=2000),
                 checkpoint=CheckpointConfig(every_steps=500))


def demo_siglip(dataset: str) -> RunConfig:
    """The demo with the sigmoid loss (SigLIP)."""
    return named("demo-siglip", demo(dataset), task=TaskConfig(loss="siglip"))


def finetune(dataset: str) -> RunConfig:
    """The contrastive champion (trained here or imported: a CLIP or SigLIP from the Hub) fine-tuned on a dataset
    version, both towers at a tenth of the demo's rate; model.parent names another, model.freeze_vision=true
    locks its image tower (LiT). Its architecture, tokenizer and normalisation are the parent's."""
    cfg = demo(dataset)
    return named("finetune", cfg, model=dataclasses.replace(cfg.model, parent="models:/mmpipe-contrastive@champion",
                                                            freeze_vision=False),
                 optim=OptimConfig(lr=1e-4, warmup_steps=20, max_steps=200),
                 checkpoint=CheckpointConfig(every_steps=100))


def debug_fusion(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest LLaVA on the contrastive champion's tower (tests)."""
    return named("debug-fusion", base("fusion", dataset, "llava-debug",
                                      OptimConfig(lr=2e-3, warmup_steps=2, max_steps=20), 10,
                                      batch_size=32, val_batches=2, augment=False, pack_length=96))


def demo_fusion(dataset: str) -> RunConfig:
    """Minutes on 2 CPU cores: LLaVA on the frozen tower of the contrastive champion; on the sample corpus's
    conversations (an instruction dataset) it answers questions about its scenes and digits, a conversation
    packed in 96 tokens."""
    return named("demo-fusion", base("fusion", dataset, "llava-demo",
                                     OptimConfig(lr=1e-3, warmup_steps=50, max_steps=400), 200,
                                     batch_size=64, val_batches=4, augment=False, pack_length=96))


def demo_flamingo(dataset: str) -> RunConfig:
    """The fusion demo with the Flamingo family (resampler + gated cross-attention): 600 steps, its
    gates open over steps, not questions (experiments/flamingo-gates)."""
    cfg = demo_fusion(dataset)
    return named("demo-flamingo", cfg, model=dataclasses.replace(cfg.model, name="flamingo-demo"),
                 optim=dataclasses.replace(cfg.optim, max_steps=600))


def quality_fusion(dataset: str) -> RunConfig:
    """The fusion demo's LLaVA for 2,000 steps (about 35 minutes of training on 2 cores): count and
    digits reach their targets, two groups' colours and the relation still do not (experiments/fusion-binding:
    binding comes between 2,000 and 4,000 steps; `long-fusion`)."""
    cfg = demo_fusion(dataset)
    return named("quality-fusion", cfg, optim=dataclasses.replace(cfg.optim, max_steps=2000),
                 checkpoint=CheckpointConfig(every_steps=500))


def long_fusion(dataset: str) -> RunConfig:
    """The fusion demo's LLaVA for 5,000 steps, for a GPU (about 3 minutes on an H200 in bf16; over 80
    minutes on 2 CPU cores): binding comes between 2,000 and 4,000 steps (experiments/fusion-binding:
    relation 0.97, two-group colour 0.83, shape 0.91 at 5,000)."""
    cfg = demo_fusion(dataset)
    return named("long-fusion", cfg, optim=dataclasses.replace(cfg.optim, max_steps=5000),
                 checkpoint=CheckpointConfig(every_steps=1000))


def debug_language(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest language model, a few steps (tests)."""
    return named("debug-language", base("language", dataset, "lm-debug",
                                        OptimConfig(lr=3e-3, warmup_steps=2, max_steps=20), 10,
                                        batch_size=32, val_batches=2, augment=False))


def demo_language(dataset: str) -> RunConfig:
    """Minutes on 2 CPU cores: a Llama-architecture LM learns the sample corpus's captions and its conversations
    as text, mixed (data.mix) as the retrain flow mixes them (the questions' loss at half the answers':
    experiments/language-stage)."""
    cfg = base("language", dataset, "lm-demo", OptimConfig(lr=3e-3, warmup_steps=50, max_steps=720), 360,
               batch_size=32, val_batches=4, augment=False)
    return named("demo-language", cfg, task=dataclasses.replace(cfg.task, text_loss=0.5))


def _on_language(cfg: RunConfig, name: str, steps: int, **model) -> RunConfig:
    """`cfg`'s LLaVA on the language champion (model.lm_parent) for `steps` steps: one of LLaVA's phases."""
    return named(name, cfg, model=dataclasses.replace(cfg.model, lm_parent="models:/mmpipe-language@champion",
                                                      **model),
                 optim=dataclasses.replace(cfg.optim, max_steps=steps, warmup_steps=min(50, steps // 5)))


def _alignment(cfg: RunConfig, name: str, steps: int) -> RunConfig:
    """LLaVA's first phase of `cfg`: tower and LM frozen, registered as `aligned`; on a caption dataset, whose
    rows are caption requests."""
    cfg = _on_language(cfg, name, steps, freeze_lm=True)
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, alias="aligned"))


def demo_alignment(dataset: str) -> RunConfig:
    """LLaVA's first phase on the demo's contrastive and language champions: both frozen, the projector learns
    to put the tower's tokens where the LM reads them, from caption requests alone (100 steps); registered
    with alias `aligned`, where `demo-instruction` starts."""
    return _alignment(demo_fusion(dataset), "demo-alignment", 100)


def demo_instruction(dataset: str) -> RunConfig:
    """LLaVA's second phase: from the aligned model (models:/mmpipe-fusion@aligned), projector and LM learn
    every question (300 steps: the two phases together take the demo-fusion budget of 400)."""
    return _on_language(demo_fusion(dataset), "demo-instruction", 300, start_from="models:/mmpipe-fusion@aligned")


def debug_alignment(dataset: str) -> RunConfig:
    """Seconds on a CPU: the first phase on the debug LLaVA (tests)."""
    return _alignment(debug_fusion(dataset), "debug-alignment", 20)


def debug_instruction(dataset: str) -> RunConfig:
    """Seconds on a CPU: the second phase on the debug LLaVA (tests)."""
    return _on_language(debug_fusion(dataset), "debug-instruction", 20, start_from="models:/mmpipe-fusion@aligned")


def debug_tokenizer(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest image tokenizer, a few steps (tests; at 300 steps it reaches about
    18 dB)."""
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, betas=[0.9, 0.99], warmup_steps=5, max_steps=20)
    return named("debug-tokenizer", base("image-tokenizer", dataset, "vq-debug", optim, 10,
                                         batch_size=32, val_batches=2, augment=False))


def demo_tokenizer(dataset: str) -> RunConfig:
    """Minutes on 2 CPU cores: the image tokenizer the unified stage reads and draws with (64-pixel
    images as 8x8 codes of a 1,000-code FSQ codebook). No weight decay: it would pull the latents,
    and so the codes, toward the middle of FSQ's grid."""
    optim = OptimConfig(lr=2e-3, weight_decay=0.0, betas=[0.9, 0.99], warmup_steps=50, max_steps=800)
    return named("demo-tokenizer", base("image-tokenizer", dataset, "vq-demo", optim, 200,
                                        batch_size=32, val_batches=4, augment=False))


def debug_unified(dataset: str) -> RunConfig:
    """Seconds on a CPU: the smallest unified model on the image tokenizer champion, a few steps (tests; it
    learns both modalities in 200)."""
    return named("debug-unified", base("unified", dataset, "unified-debug",
                                       OptimConfig(lr=3e-3, warmup_steps=5, max_steps=20), 10,
                                       batch_size=32, val_batches=2, augment=False, pack_length=40))


def demo_unified(dataset: str) -> RunConfig:
    """Minutes on 2 CPU cores: one transformer that draws scenes from captions and, with the sample corpus's
    conversations mixed in (data.mix, data.draw_fraction 1), answers about its images, over the demo image
    tokenizer's 8 x 8 codes. A reading sample packs its conversation in the context, the length a drawing
    sample takes anyway (longer packs pad the drawings too)."""
    return named("demo-unified", base("unified", dataset, "unified-demo",
                                      OptimConfig(lr=1e-3, warmup_steps=50, max_steps=800), 200,
                                      batch_size=32, val_batches=4, augment=False, pack_length=40))


def gpu_base(dataset: str) -> RunConfig:
    """ViT-B/16 on GPUs: bf16, ZeRO-2, one worker per GPU (set parallel.num_workers to the GPU count)."""
    cfg = base("contrastive", dataset, "clip-vit-b16",
               OptimConfig(lr=5e-4, weight_decay=0.2, warmup_steps=500, max_steps=10000), 1000,
               batch_size=256, val_batches=8)
    return named("gpu-base", cfg, parallel=ParallelConfig(num_workers=1, use_gpu=True, zero_stage=2,
                                                          precision="bf16"))


RECIPES = {"debug": debug, "demo": demo, "quality": quality, "demo-siglip": demo_siglip, "gpu-base": gpu_base,
           "finetune": finetune,
           "debug-fusion": debug_fusion, "demo-fusion": demo_fusion, "demo-flamingo": demo_flamingo,
           "quality-fusion": quality_fusion, "long-fusion": long_fusion,
           "debug-language": debug_language, "demo-language": demo_language,
           "demo-alignment": demo_alignment, "demo-instruction": demo_instruction,
           "debug-alignment": debug_alignment, "debug-instruction": debug_instruction,
           "debug-tokenizer": debug_tokenizer, "demo-tokenizer": demo_tokenizer,
           "debug-unified": debug_unified, "demo-unified": demo_unified}


def recipe(name: str, dataset: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name](dataset)
