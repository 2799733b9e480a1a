"""Deployments the Prefect UI can run: one per flow, a cron schedule and a `dataset.landed` trigger on retrain."""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger

from pipelines.flows import DATASET_LANDED, evaluate_flow, ingest_flow, retrain_flow, train_flow
from pipelines.params import FusionSettings, TrainSettings

DEPLOYMENT = "mmpipe"


def deployments(retrain_cron: str = "", retrain_on_landing: bool = True, retrain_recipe: str = "demo",
                timezone: str = "UTC", retrain_fusion_recipe: str = "demo-fusion") -> list:
    """The four deployments; retrain runs on `retrain_cron` (off when empty) and whenever a dataset lands,
    with `retrain_recipe` for the contrastive stage and `retrain_fusion_recipe` ("none": skipped) for fusion."""
    TrainSettings(recipe=retrain_recipe)  # an unknown recipe fails here, not at the first trigger
    skip_fusion = retrain_fusion_recipe == "none"
    fusion = FusionSettings(**({} if skip_fusion else {"recipe": retrain_fusion_recipe}))
    landed = DeploymentEventTrigger(
        name="retrain when a dataset version lands", enabled=retrain_on_landing,
        expect={DATASET_LANDED}, match={"prefect.resource.id": "mmpipe.dataset.*"},
        parameters={"params": {"dataset": "{{ event.payload.path }}", "train": {"recipe": retrain_recipe},
                               "fusion": {"recipe": fusion.recipe}, "skip_fusion": skip_fusion}},
    )
    schedules = [CronSchedule(cron=retrain_cron, timezone=timezone)] if retrain_cron else None
    common = dict(name=DEPLOYMENT, tags=["mmpipe"])
    return [
        ingest_flow.to_deployment(description="URL list -> versioned dataset; emits dataset.landed", **common),
        train_flow.to_deployment(description="Train a stage and register the model @candidate", **common),
        evaluate_flow.to_deployment(description="Evaluate @candidate; promote to @champion on a clear win",
                                    **common),
        retrain_flow.to_deployment(description="ingest -> contrastive -> fusion, each trained, evaluated and "
                                               "promoted", schedules=schedules,
                                   triggers=[landed], **common),
    ]


def serve_deployments(retrain_cron: str = "", retrain_on_landing: bool = True, retrain_recipe: str = "demo",
                      limit: int = 1, retrain_fusion_recipe: str = "demo-fusion") -> None:
    """Register the deployments with the Prefect API and run what they schedule here until interrupted.

    `limit` flow runs at a time: training takes the machine's cores, two at once would only fight.
    """
    serve(*deployments(retrain_cron, retrain_on_landing, retrain_recipe,
                       retrain_fusion_recipe=retrain_fusion_recipe), limit=limit)
