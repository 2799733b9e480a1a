"""What each training stage is, in one record.

Adding a stage adds a record here, its Task (tasks.py), its model families (models/) and its recipes
(recipes.py); the trainer, fit(), the CLI, the flows' forms and the gate read the record and need no edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass



@dataclass(frozen=True)
class Parent:
    """A registered model a stage builds on."""

    stage: str
    """The parent's stage."""
    default: str
    """The parent a recipe names unless told otherwise; empty: the parent is optional (none by default)."""
    takes: Callable[[dict], dict]
    """The part of the parent's architecture (its model.json) the child's architecture takes; a parent of the
    child's own stage (a model fine-tuned) gives the whole architecture."""


@dataclass(frozen=True)
class Stage:
    name: str
    task_name: str
    """Its Task in mmcore/tasks.py: model + loss + batch contract, and the factory of the stage's tokenizer
    and stream (named, so that reading a record imports no torch: the CLI starts in a fraction of a second)."""
    families: tuple[str, ...]
    """The model families (models/configs/*.json "family") the stage trains."""
    losses: tuple[str, ...]
    """task.loss values; the first is the default."""
    primary: str
    """suite.metric the promotion gate compares, unless told otherwise."""
    recipe: str
    """The recipe `mmpipe train STAGE` runs when none is named."""
    parent: Parent | None = None
    lm_parent: Parent | None = None
    """The registered language model its LM may start from (model.lm_parent), and what it takes of it."""
    packs: bool = False
    """Packs a conversation's turns past the context into one training sequence (data.pack_length)."""
    question_loss: bool = False
    """Has a next-token loss on the questions' tokens to weigh (task.question_loss)."""
    starts_from: bool = False
    """Can start every weight from a registered model of its own stage (model.start_from: LLaVA's second phase)."""
    text_loss: bool = False
    """Weighs the loss on the text a chat is about against the answers' (task.text_loss: the language stage)."""
    reads: tuple[str, ...] = ("captions",)
    """The dataset kinds it trains on (SourceConfig.kind): captions, and instructions (conversations)."""

    @property
    def task(self) -> type:
        from mmcore import tasks

        return getattr(tasks, self.task_name)


def _without_card(config: dict) -> dict:
    """A model config less its `family` and `description` (models.architecture, without importing torch)."""
    return {k: v for k, v in config.items() if k not in ("family", "description")}


def _vision(parent: dict) -> dict:
    """What a fusion model takes of its contrastive parent: the vision tower's config, and an imported CLIP's or
    SigLIP's whole config (whose vision model becomes the tower; models/pretrained_clip.py)."""
    if parent.get("family") != "hf-clip":
        return {"vision": parent["vision"]}
    from mmcore.models.pretrained_clip import vision_config

    return {"vision": vision_config(parent["hf"]), "vision_hf": _without_card(parent)}


STAGES = {stage.name: stage for stage in (
    Stage("contrastive", "ContrastiveTask", ("clip", "hf-clip"), ("clip", "siglip"), "retrieval.image_to_text_recall_5",
          "demo", parent=Parent("contrastive", "", lambda parent: parent)),
    Stage("fusion", "FusionTask", ("llava", "flamingo"), ("next-token",), "vqa.accuracy", "demo-fusion",
          parent=Parent("contrastive", "models:/mmpipe-contrastive@champion", _vision),
          lm_parent=Parent("language", "models:/mmpipe-language@champion",
                           lambda parent: {"language": _without_card(parent)}),
          packs=True, question_loss=True, starts_from=True, reads=("captions", "instructions")),
    Stage("language", "LanguageTask", ("lm",), ("next-token",), "text.answer_accuracy", "demo-language",
          text_loss=True, reads=("captions", "instructions")),
    Stage("image-tokenizer", "ImageTokenizerTask", ("vq",), ("mse",), "reconstruction.psnr", "demo-tokenizer"),
    Stage("unified", "UnifiedTask", ("unified",), ("next-token",), "vqa.accuracy", "demo-unified",
          parent=Parent("image-tokenizer", "models:/mmpipe-image-tokenizer@champion",
                        lambda parent: {"image_tokenizer": _without_card(parent)}),
          lm_parent=Parent("language", "models:/mmpipe-language@champion",
                           lambda parent: {"language": _without_card(parent)}),
          packs=True, reads=("captions", "instructions")),
)}

