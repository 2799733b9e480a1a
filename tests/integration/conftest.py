"""Integration fixtures: a project home, a small dataset version made by a real ingest, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmcore.data.config import GuardConfig, IngestConfig, SourceConfig, SplitConfig
from mmcore.data.ingest import ingest
from mmcore.data.synthetic.corpus import SampleSpec, make_sample


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
def train_chats(train_dataset, served_dir, tmp_path_factory):
    """The same corpus's questions as instruction data: its conversations.jsonl (two conversations about each
    image, its image by URL) ingested like a user's file; a conversation's image is in the split its URL gives
    the caption dataset."""
    server, root = served_dir
    out = tmp_path_factory.mktemp("datasets") / "train-chats-v1"
    return ingest(IngestConfig(source=SourceConfig(str(root / "train-corpus" / "conversations.jsonl"),
                                                   kind="instructions"), out=str(out),
                               guard=GuardConfig(allow_networks=["127.0.0.1/32"])))


PHOTO_CONVERSATIONS = Path(__file__).parents[1] / "data" / "photo_conversations.json"
"""Conversations written by hand about the sample corpus's real photos (scikit-image, scikit-learn, LFW), their
images by path relative to the corpus's images directory."""


@pytest.fixture(scope="session")
def photo_conversations(served_dir, tmp_path_factory):
    """An instruction dataset version: PHOTO_CONVERSATIONS ingested with --images (a third of the images in the
    test split, so that a small file leaves every split some)."""
    server, root = served_dir
    make_sample(root / "photo-corpus", f"{server.url}/photo-corpus",
                SampleSpec(synthetic=10, digits=10, defects=False, seed=2))
    out = tmp_path_factory.mktemp("datasets") / "photos-v1"
    return ingest(IngestConfig(source=SourceConfig(str(PHOTO_CONVERSATIONS), kind="instructions",
                                                   images=str(root / "photo-corpus" / "images")),
                               out=str(out), split=SplitConfig(val_fraction=0.2, test_fraction=0.3)))


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, started as `fit` starts it (4 logical CPUs on 2 cores)."""
    from mmcore.train.fit import connect_ray

    ray = connect_ray()
    yield ray
    ray.shutdown()


def debug_config(dataset, *overrides):
    """The debug recipe, long enough to learn: 120 steps, checkpoint at 60, the rows each worker
    trained on recorded (the exactly-once test compares a killed run's with an uninterrupted one's).

    (At 80 steps the last window's loss ended between 2.68 and 2.95 against the 2.95 bound of
    test_zero2_run_learns: inside its own noise.)"""
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe

    base = ["optim.max_steps=120", "optim.lr=0.003", "checkpoint.every_steps=60", "optim.warmup_steps=5",
            "data.record_samples=true"]
    return apply_overrides(recipe("debug", str(dataset.path)), base + list(overrides))


@pytest.fixture(scope="session")
def debug_cfg():
    """debug_config, for tests that train with extra overrides."""
    return debug_config


@pytest.fixture(scope="session")
def trained(train_dataset, local_ray, mmpipe_home):
    """A debug CLIP trained with ZeRO-2 on 2 workers, registered as mmpipe-contrastive@candidate."""
    from mmcore.train.fit import fit

    return fit(debug_config(train_dataset))



@pytest.fixture(scope="session")
def image_tokenizer(train_dataset, mmpipe_home):
    """The debug image tokenizer (300 steps) trained here, registered as mmpipe-image-tokenizer@candidate."""
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from tests.integration.workers import HERE

    return fit(apply_overrides(recipe("debug-tokenizer", str(train_dataset.path)),
                               ["optim.max_steps=300", "checkpoint.every_steps=150", *HERE]))


@pytest.fixture(scope="session")
def language_model(train_dataset, train_chats, mmpipe_home):
    """The debug language model (60 steps) trained here on the captions with the corpus's conversations mixed
    in, registered as mmpipe-language@candidate."""
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from tests.integration.workers import HERE

    return fit(apply_overrides(recipe("debug-language", str(train_dataset.path)),
                               ["optim.max_steps=60", "checkpoint.every_steps=30",
                                f'data.mix={{"{train_chats.path}": 0.5}}', *HERE]))
