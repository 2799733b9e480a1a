"""Deployments the Prefect UI can run: one per flow, a cron schedule and a `dataset.landed` trigger on retrain."""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger

from pipelines.flows import DATASET_LANDED, evaluate_flow, infer_flow, ingest_flow, retrain_flow, train_flow
from pipelines.params import FusionSettings, TokenizerSettings, TrainSettings, UnifiedSettings

DEPLOYMENT = "mmpipe"


def deployments(retrain_cron: str = "", retrain_on_landing: bool = True, retrain_recipe: str = "demo",
                timezone: str = "UTC", retrain_fusion_recipe: str = "demo-fusion",
                retrain_tokenizer_recipe: str = "demo-tokenizer", retrain_unified_recipe: str = "demo-unified") -> list:
    """The five deployments; retrain runs on `retrain_cron` (off when empty) and whenever a dataset lands,
    with `retrain_recipe` for the contrastive stage, `retrain_fusion_recipe` ("none": skipped) for fusion,
    and the image tokenizer's and unified recipes ("none" for the unified one skips both)."""
    TrainSettings(recipe=retrain_recipe)  # an unknown recipe fails here, not at the first trigger
    skip_fusion, skip_unified = retrain_fusion_recipe == "none", retrain_unified_recipe == "none"
    fusion = FusionSettings(**({} if skip_fusion else {"recipe": retrain_fusion_recipe}))
    tokenizer = TokenizerSettings(recipe=retrain_tokenizer_recipe)
    unified = UnifiedSettings(**({} if skip_unified else {"recipe": retrain_unified_recipe}))
    landed = DeploymentEventTrigger(
        name="retrain when a dataset version lands", enabled=retrain_on_landing,
        expect={DATASET_LANDED}, match={"prefect.resource.id": "mmpipe.dataset.*"},
        parameters={"params": {"dataset": "{{ event.payload.path }}", "train": {"recipe": retrain_recipe},
                               "fusion": {"recipe": fusion.recipe}, "skip_fusion": skip_fusion,
                               "tokenizer": {"recipe": tokenizer.recipe}, "unified": {"recipe": unified.recipe},
                               "skip_unified": skip_unified}},
    )
    schedules = [CronSchedule(cron=retrain_cron, timezone=timezone)] if retrain_cron else None
    common = dict(name=DEPLOYMENT, tags=["mmpipe"])
    return [
        ingest_flow.to_deployment(description="URL list -> versioned dataset; emits dataset.landed", **common),
        train_flow.to_deployment(description="Train a stage and register the model @candidate", **common),
        evaluate_flow.to_deployment(description="Evaluate @candidate; promote to @champion on a clear win",
                                    **common),
        infer_flow.to_deployment(description="A registered model's embeddings, CLIP scores, image codes or captions "
                                             "of every row of a dataset version, kept beside it", **common),
        retrain_flow.to_deployment(description="ingest -> contrastive -> fusion -> image tokenizer -> unified, "
                                               "each trained, evaluated and promoted", schedules=schedules,
                                   triggers=[landed], **common),
    ]


def serve_deployments(retrain_cron: str = "", retrain_on_landing: bool = True, retrain_recipe: str = "demo",
                      limit: int = 1, retrain_fusion_recipe: str = "demo-fusion",
                      retrain_tokenizer_recipe: str = "demo-tokenizer", retrain_unified_recipe: str = "demo-unified") -> None:
    """Register the deployments with the Prefect API and run what they schedule here until interrupted.

    `limit` flow runs at a time: training takes the machine's cores, two at once would only fight.
    """
    serve(*deployments(retrain_cron, retrain_on_landing, retrain_recipe, retrain_fusion_recipe=retrain_fusion_recipe,
                       retrain_tokenizer_recipe=retrain_tokenizer_recipe,
                       retrain_unified_recipe=retrain_unified_recipe), limit=limit)
