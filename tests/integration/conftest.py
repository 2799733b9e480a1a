"""Integration fixtures: a project home, a small dataset version made by a real ingest, a local Ray."""

from __future__ import annotations

import os

import pytest

from mmcore.config import GuardConfig, IngestConfig, SourceConfig
from mmcore.data.ingest import ingest
from mmcore.data.sample import SampleSpec, make_sample


@pytest.fixture(scope="session")
def mmpipe_home(tmp_path_factory):
    """MMPIPE_HOME for the session: MLflow's sqlite file, runs and checkpoints go here."""
    home = tmp_path_factory.mktemp("home")
    saved = os.environ.get("MMPIPE_HOME")
    os.environ["MMPIPE_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("MMPIPE_HOME", None)
    else:
        os.environ["MMPIPE_HOME"] = saved


@pytest.fixture(scope="session")
def train_dataset(served_dir, tmp_path_factory):
    """A clean dataset version (synthetic scenes and digits) ingested from the loopback server."""
    server, root = served_dir
    url_list = make_sample(root / "train-corpus", f"{server.url}/train-corpus",
                           SampleSpec(synthetic=500, digits=150, photos=False, defects=False, seed=7))
    out = tmp_path_factory.mktemp("datasets") / "train-v1"
    return ingest(IngestConfig(source=SourceConfig(str(url_list)), out=str(out),
                               guard=GuardConfig(allow_networks=["127.0.0.1/32"])))


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session (4 logical CPUs: data tasks beside two training workers)."""
    import ray
    import ray.data

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
