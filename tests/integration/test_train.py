"""The contrastive stage for real: local Ray, 2 CPU workers, DeepSpeed ZeRO, MLflow on sqlite."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcore.data.config import FilterConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.data.dataset import DatasetError
from mmcore.data.ingest import ingest
from mmcore.models.preprocess import Preprocessor, PreprocessConfig
from mmcore.bundle import ModelBundle
from mmcore.tracking import TrackingError
from mmcore.train import checkpoint
from mmcore.train.fit import fit
from tests.integration.workers import fit_killing_a_worker

pytestmark = pytest.mark.integration


def test_zero2_run_learns(trained):
    chance = math.log(32)  # global batch 32: the loss of a model that has learned nothing
    assert trained.metrics["loss"] < 0.85 * chance
    assert trained.metrics["val_loss"] < 0.9 * chance
    assert trained.metrics["step"] == 120 and trained.metrics["bad_steps"] == 0
    assert trained.metrics["tracking_failures"] == 0


def test_run_is_tracked_and_registered(trained, train_dataset, mmpipe_home):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    version = client.get_model_version_by_alias(trained.model_name, "candidate")
    assert str(version.version) == trained.model_version and version.run_id == trained.mlflow_run_id
    assert version.tags["dataset_id"] == train_dataset.id and version.tags["stage"] == "contrastive"
    run = client.get_run(trained.mlflow_run_id)
    assert run.data.params["optim.max_steps"] == "120" and run.data.params["parallel.zero_stage"] == "2"
    assert run.data.tags["mmpipe.dataset_id"] == train_dataset.id
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [train_dataset.id]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert any(key.startswith("system/") for key in run.data.metrics), "system metrics are recorded"


def test_checkpoints_are_sealed(trained):
    root = Path(trained.run_dir) / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000060"]
    assert checkpoint.verify(root / "step-00000060")


def test_a_fresh_process_loads_the_same_model_by_alias(trained, train_dataset, mmpipe_home):
    import numpy as np
    import torch

    model, pre = ModelBundle.at(Path(trained.run_dir) / "final").load()
    val = train_dataset.read("val").slice(0, 4)
    with torch.no_grad():
        expected = torch.cat([model.encode_image(torch.from_numpy(pre.images(val.column("image").to_pylist()))),
                              model.encode_text(torch.from_numpy(pre.tokens(val.column("caption").to_pylist())))])
    probe = Path(trained.run_dir) / "probe.parquet"
    val.select(["image", "caption"]).to_pandas().to_parquet(probe)
    code = f"""
import json, mlflow, numpy as np, pandas as pd, torch
from mmcore.registry import load_model
mlflow.set_tracking_uri("sqlite:///{mmpipe_home / 'mlflow.db'}")
rows = pd.read_parquet("{probe}")
model, pre = load_model("models:/{trained.model_name}@candidate")
with torch.no_grad():
    native = torch.cat([model.encode_image(torch.from_numpy(pre.images(list(rows.image)))),
                        model.encode_text(torch.from_numpy(pre.tokens(list(rows.caption))))]).numpy()
pyfunc = mlflow.pyfunc.load_model("models:/{trained.model_name}@candidate")
frame = pd.concat([pd.DataFrame({{"image": list(rows.image)}}), pd.DataFrame({{"text": list(rows.caption)}})],
                  ignore_index=True)
print(json.dumps({{"native": native.tolist(), "pyfunc": np.asarray(pyfunc.predict(frame)).tolist()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.allclose(np.array(got["native"]), expected.numpy(), atol=1e-5)
    assert np.allclose(np.array(got["pyfunc"]), expected.numpy(), atol=1e-5)


def test_rerunning_the_same_command_returns_the_finished_run(trained, train_dataset, debug_cfg):
    started = time.monotonic()
    again = fit(debug_cfg(train_dataset))
    assert again == trained and time.monotonic() - started < 30


def test_model_score_filter_uses_the_registered_model(trained, served_dir, tmp_path, mmpipe_home):
    server, root = served_dir
    url_list = root / "train-corpus" / "urls.parquet"
    version = ingest(IngestConfig(
        source=SourceConfig(str(url_list)), out=str(tmp_path / "scored"),
        guard=GuardConfig(allow_networks=["127.0.0.1/32"]),
        filters=FilterConfig(model_score_uri=f"models:/{trained.model_name}@candidate",
                             model_score_top_fraction=0.8)))
    rows = version.manifest["rows"]
    assert rows["in"] == rows["kept"] + sum(rows["rejected"].values())
    scored = rows["in"] - sum(v for k, v in rows["rejected"].items() if k != "model_score")
    assert rows["rejected"]["model_score"] == pytest.approx(0.2 * scored, abs=3)
    assert version.manifest["config"]["filters"]["model_score_uri"].endswith("@candidate")


def _recorded(run_dir: str, rank: int) -> list[tuple[int, int]]:
    lines = (Path(run_dir) / "samples" / f"rank-{rank}.tsv").read_text().splitlines()
    return [tuple(map(int, line.split("\t"))) for line in lines]


@pytest.mark.fault
def test_a_killed_worker_resumes_at_the_row_its_checkpoint_was_taken(trained, train_dataset, local_ray,
                                                                       mmpipe_home, debug_cfg, fault):
    cfg = debug_cfg(train_dataset, "checkpoint.every_steps=20", "checkpoint.max_failures=1",
               'tracking.model_name="mmpipe-resume-test"')
    result, killed_at = fit_killing_a_worker(cfg, mmpipe_home / "runs",
                                             "debug-contrastive-*/checkpoints/step-00000020")
    assert result.metrics["step"] == 120
    assert result.metrics["resumed_from"] >= 20, "the restarted workers resume from a checkpoint"
    assert result.model_version == "1"

    # Exactly once: the rows behind the resumed model are the uninterrupted run's (same seed), in order.
    rows = train_dataset.manifest["splits"]["train"]
    streams = [_recorded(result.run_dir, rank) for rank in range(2)]
    for rank, stream in enumerate(streams):
        assert len(stream) == 120 * cfg.data.batch_size // 2
        assert stream == _recorded(trained.run_dir, rank), f"rank {rank} trained on other rows than without the kill"
    finished = min(stream[-1][0] for stream in streams)  # epochs before it are complete on both ranks
    assert finished >= 2
    for epoch in range(finished + 1):
        seen = sorted(row for stream in streams for e, row in stream if e == epoch)
        if epoch < finished:
            assert seen == list(range(rows)), f"epoch {epoch}: every train row once, none twice"
        assert len(seen) == len(set(seen)), f"epoch {epoch}: no row twice"
    fault("worker-killed", "SIGKILL to a Ray Train worker after the step-20 checkpoint (contrastive, ZeRO-2)", 1,
          f"killed at step {killed_at}, resumed from step {result.metrics['resumed_from']}: "
          f"{killed_at - result.metrics['resumed_from']} steps trained again (checkpoints every 20)")
    fault("exactly-once", "the same kill; rows recorded per rank against an uninterrupted run", 1,
          f"0 rows repeated or skipped: 2 ranks x {len(streams[0])} rows identical, "
          f"{finished} complete epochs each row once")


def test_batches_read_in_process_are_the_ones_the_ray_stream_gives(train_dataset, local_ray):
    """Validation reads its few batches in the worker, without Ray Data's tasks: the same rows and
    tensors as the Ray Data stream of the val split, the stream's batches dealt to the ranks in turn.
    So does the one-process trainer's reader (units.local_batches) for a whole train stream."""
    import torch

    from mmcore.data.stream import torch_batches, units_dataset
    from mmcore.data.units import fixed_batches, local_batches, work_units

    pre = Preprocessor(PreprocessConfig(image_size=32, context_length=16), train_dataset.tokenizer_path.read_text())
    units = work_units(train_dataset, "val")
    ranks = [fixed_batches(units, pre, 8, 2, rank, 2) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [2, 2], "a split in one row group still reaches every rank"
    assert fixed_batches(units, pre, 8, 2, 1, 2)[1]["sample"].tolist() == ranks[1][1]["sample"].tolist()
    rows = train_dataset.manifest["splits"]["val"]
    assert len(fixed_batches(units, pre, 8, 1000)) == rows // 8, "whole batches, as many as the split holds"
    # As many on every rank (CLIP's loss is a collective): the 2 * 3 whole batches of `rows` // 2 rows.
    size = rows // 6
    assert [len(fixed_batches(units, pre, size, 1000, rank, 3)) for rank in range(3)] == [2, 2, 2]
    assert [len(fixed_batches(units, pre, rows, 1, rank, 2)) for rank in range(2)] == [0, 0]
    streamed = torch_batches(units_dataset(units, pre), 8, torch.device("cpu"))
    for fixed in (ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]):
        batch, _ = next(streamed)
        assert batch.keys() == fixed.keys() == {"image", "tokens", "epoch", "sample"}
        assert all(torch.equal(batch[k], fixed[k]) and batch[k].dtype == fixed[k].dtype for k in batch)
    # The one-process trainer reads the same batches as Ray Data's stream of the same units: two epochs of
    # the shuffled train split, batches across row groups and epochs, the last partial one dropped.
    train = work_units(train_dataset, "train", 2, seed=3)
    here = local_batches(train, pre, 48, "cpu")
    count = 2 * train_dataset.manifest["splits"]["train"] // 48
    for index, (batch, _) in enumerate(torch_batches(units_dataset(train, pre), 48, torch.device("cpu"))):
        if index == count:
            break
        mine, _ = next(here)
        assert all(torch.equal(batch[k], mine[k]) and batch[k].dtype == mine[k].dtype for k in batch), index


@pytest.mark.fault
def test_preflight_errors_come_before_any_worker(train_dataset, tmp_path, mmpipe_home, debug_cfg, fault):
    _cfg = debug_cfg
    runs_before = set((Path(mmpipe_home) / "runs").glob("*")) if (Path(mmpipe_home) / "runs").exists() else set()
    with pytest.raises(DatasetError, match="no dataset version here"):
        fit(_cfg(train_dataset, f'data.dataset="{tmp_path / "missing"}"'))

    tampered = tmp_path / "tampered"
    shutil.copytree(train_dataset.path, tampered)
    shard = sorted((tampered / "shards").glob("train-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-100] + b"x" * 100)
    with pytest.raises(DatasetError, match=f"fails verification.*{shard.name}"):
        fit(_cfg(train_dataset, f'data.dataset="{tampered}"'))

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(train_dataset.path, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(DatasetError, match="tokenizer is missing"):
        fit(_cfg(train_dataset, f'data.dataset="{no_tokenizer}"'))

    for overrides, error, match in [
        (['model.name="clip-huge"'], ValueError, "model.name: unknown architecture"),
        (["parallel.zero_stage=5"], ValueError, "parallel.zero_stage"),
        (["data.batch_size=33"], ValueError, "data.batch_size"),
        (['tracking.uri="http://127.0.0.1:9"'], TrackingError, "MLflow at http://127.0.0.1:9 is not reachable"),
    ]:
        with pytest.raises(error, match=match):
            fit(_cfg(train_dataset, *overrides))
    runs_after = set((Path(mmpipe_home) / "runs").glob("*")) if (Path(mmpipe_home) / "runs").exists() else set()
    assert runs_after == runs_before
    fault("corrupted", "the last 100 bytes of a train shard overwritten after the manifest was written", 1,
          "nothing: the shard is named before any worker starts, no run directory is made")


def test_a_local_ray_started_off_the_main_thread_outlives_that_thread(tmp_path):
    """Ray kills a local cluster's GCS and raylet when the thread that started them ends (PR_SET_PDEATHSIG):
    a fit() in a thread (a Prefect task runner's) must not leave a dead cluster behind. In a fresh process,
    so that this session's Ray is not the one reused."""
    code = ("import threading, time, ray\nfrom mmcore.train.fit import connect_ray\n"
            "starter = threading.Thread(target=connect_ray)\nstarter.start()\nstarter.join()\ntime.sleep(2)\n"
            "print('answer', ray.get(ray.remote(lambda: 21 * 2).remote(), timeout=120))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "answer 42" in done.stdout, done.stderr[-3000:]
