"""ZeRO-3 with activation checkpointing on a simulated 2-node Ray cluster (ray.cluster_utils)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmcore.cli import apply_overrides
from mmcore.recipes import recipe
from mmcore.tracking import ModelBundle
from mmcore.train.fit import fit

pytestmark = pytest.mark.integration


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if any; it is not used again after this module
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_zero3_on_two_nodes_learns_and_consolidates(train_dataset, two_node_cluster, mmpipe_home):
    cfg = apply_overrides(recipe("debug", str(train_dataset.path)), [
        "optim.max_steps=120", "optim.lr=0.003", "optim.warmup_steps=5", "checkpoint.every_steps=60",
        "parallel.zero_stage=3", "parallel.activation_checkpointing=true",
        f'cluster.address="{two_node_cluster.address}"', 'tracking.model_name="mmpipe-zero3-test"',
    ])
    result = fit(cfg)
    assert result.metrics["loss"] < 0.85 * math.log(32)
    model, _ = ModelBundle.at(Path(result.run_dir) / "final").load()
    assert all(p.numel() > 0 for p in model.parameters()), "ZeRO-3 partitions were gathered before saving"
