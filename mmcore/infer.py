"""Batch inference: a registered model over every row of a dataset version, kept as a derived version beside it
(data/derived.py: computed once per (dataset version, model version) by Ray Data actors, or in this process;
resumed shard by shard; in a bucket too). `mmpipe infer` calls `infer`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmcore.data.dataset import DatasetVersion
from mmcore.data.derived import KINDS, Derivation, DerivedVersion, derive

OUTPUTS = {"embeddings": "embeddings", "clip-score": "clip-score", "codes": "image-codes", "captions": "captions"}
"""`--output` -> the derived version's kind."""


def infer(uri: str, dataset: str, output: str, executor: str = "ray", ray_address: str = "",
          tracking_uri: str | None = None) -> tuple[DerivedVersion, float]:
    """`output` of the registered model `uri` (pinned to its version) for every row of the dataset version at
    `dataset` -> (its derived version, seconds taken). A model without the capability, or a dataset without the
    columns, is refused before anything is computed."""
    from mmcore import tracking
    from mmcore.config import TrackingConfig

    if output not in OUTPUTS:
        raise ValueError(f"--output {output!r}: one of {', '.join(OUTPUTS)}")
    kind = KINDS[OUTPUTS[output]]
    version = DatasetVersion.open(dataset)
    if version.kind not in kind.reads:
        raise ValueError(f"{version.path}: dataset {version.id} holds {version.kind}; {output} reads a dataset of "
                         f"{' or '.join(kind.reads)}")
    tracking_uri = tracking_uri or tracking.resolve_uri(TrackingConfig())
    tracking.check_reachable(tracking_uri)
    pinned, bundle = pin_capable(uri, OUTPUTS[output], tracking_uri, f"{output} needs")
    map_shards = None
    if executor == "ray":
        from mmcore.data.stream import derive_on_ray
        from mmcore.train.fit import connect_ray

        connect_ray(ray_address)
        map_shards = derive_on_ray
    started = time.perf_counter()
    derived = derive(version, Derivation(OUTPUTS[output], pinned, bundle.directory), map_shards)
    return derived, time.perf_counter() - started


def pin_capable(uri: str, kind: str, tracking_uri: str, asking: str):
    """The registered model `uri` pinned to its version and fetched -> (models:/name/version, its bundle), when
    it can compute the derived `kind`; else a ValueError naming what it can compute (`asking`: who asks,
    "captions needs", "data.captioner needs")."""
    from mmcore import registry
    from mmcore.models import FAMILIES, capabilities

    name, number = registry.resolve_version(uri, tracking_uri)
    pinned = f"models:/{name}/{number}"
    bundle = registry.model_files(pinned, tracking_uri)
    family = json.loads(Path(bundle.config).read_text()).get("family")
    can = capabilities(FAMILIES[family][1]) if family in FAMILIES else set()
    needs = KINDS[kind].needs
    if needs not in can:
        able = " or ".join(out for out, k in OUTPUTS.items() if KINDS[k].needs in can) or "none of these outputs"
        raise ValueError(f"{uri} ({pinned}) is a {family} model, which computes {able}; {asking} a model that "
                         f"can {needs}")
    return pinned, bundle
