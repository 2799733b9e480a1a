"""Training parts without a cluster: configs, DeepSpeed config, checkpoints, the step guard."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mmcore.config import ClusterConfig, DataConfig, OptimConfig, ParallelConfig, RunConfig
from mmcore.recipes import RECIPES, recipe
from mmcore.train import checkpoint
from mmcore.train.deepspeed_config import build_ds_config, resolve_precision
from mmcore.train.ranks import Ranks
from mmcore.train.trainer import NonFiniteLoss, StepGuard


def _cfg(**kw):
    return RunConfig(data=DataConfig(dataset="d", batch_size=kw.pop("batch", 64)), **kw)


@pytest.mark.parametrize("cfg, field", [
    (_cfg(parallel=ParallelConfig(zero_stage=5)), "parallel.zero_stage"),
    (_cfg(parallel=ParallelConfig(threads_per_worker=-1)), "parallel.threads_per_worker"),
    (_cfg(batch=63, parallel=ParallelConfig(num_workers=2)), "data.batch_size"),
    (_cfg(batch=64, parallel=ParallelConfig(num_workers=2, grad_accum=3)), "data.batch_size"),
    (_cfg(parallel=ParallelConfig(offload_params=True, zero_stage=2)), "parallel.offload_params"),
    (_cfg(parallel=ParallelConfig(precision="fp16")), "parallel.precision"),
    (_cfg(optim=OptimConfig(fused=True), parallel=ParallelConfig(offload_optimizer=True)), "optim.fused"),
    (RunConfig(), "data.dataset"),
    (_cfg(cluster=ClusterConfig(executor="local")), "cluster.executor"),
    (_cfg(cluster=ClusterConfig(executor="here"), parallel=ParallelConfig(num_workers=2)), "parallel.num_workers"),
])
def test_invalid_run_configs_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        cfg.validate()


def test_every_recipe_is_valid():
    for name in RECIPES:
        recipe(name, "some/dataset").validate()
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("nope", "d")


def test_deepspeed_config_follows_the_run_config():
    cfg = _cfg(batch=64, parallel=ParallelConfig(num_workers=2, grad_accum=2, zero_stage=3, offload_optimizer=True,
                                                 offload_params=True))
    ds = build_ds_config(cfg, "bf16")
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["optimizer"]["params"]["torch_adam"] is False  # CPU offload needs DeepSpeed's CPU Adam
    assert build_ds_config(_cfg(), "fp32")["optimizer"]["params"]["torch_adam"] is True


def test_fused_adamw_reaches_torch_and_steps_as_the_default_one():
    """optim.fused: the parameters DeepSpeed hands torch's AdamW (torch_adam) make its fused implementation, which
    steps on the CPU as the default implementation does."""
    import torch

    weights = {}
    for fused in (False, True):
        params = dict(build_ds_config(_cfg(optim=OptimConfig(fused=fused)), "fp32")["optimizer"]["params"])
        assert params.pop("torch_adam") is True
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        optimizer = torch.optim.AdamW(layer.parameters(), **params)
        assert bool(optimizer.defaults.get("fused")) is fused
        for _ in range(3):  # gradients set by hand: the optimizer's step is what is compared
            for parameter in layer.parameters():
                parameter.grad = torch.randn_like(parameter)
            optimizer.step()
        weights[fused] = layer.weight.detach()
    assert torch.allclose(weights[True], weights[False], atol=1e-6)


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    """DeepSpeed's scheduler as our config builds it: lr rises in a straight line (its default warm-up
    is log-shaped), peaks at optim.lr, ends at 0.1 x lr. (DeepSpeed runs the first two steps at lr 0.)"""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = _cfg()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps = 1e-3, 10, 100
    params = build_ds_config(cfg, "fp32")["scheduler"]["params"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = WarmupCosineLR(optimizer, **params)
    lrs = []
    for _ in range(cfg.optim.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rises = [b - a for a, b in zip(lrs[1:11], lrs[2:12])]
    assert rises == pytest.approx([cfg.optim.lr / cfg.optim.warmup_steps] * 10, rel=0.01)  # a straight line
    assert max(lrs) == pytest.approx(1e-3, rel=0.01)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_precision_resolution():
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16_supported=False) == "fp32"
    with pytest.raises(ValueError, match="parallel.precision"):
        resolve_precision("bf16", cuda=True, bf16_supported=False)


def _write_checkpoint(root, step, payload=b"weights", keep=10):
    """A checkpoint saved through the disk store by one rank, as the trainer saves one."""
    def write(directory):
        (directory / "state").mkdir(parents=True)
        (directory / "state" / "rank0.pt").write_bytes(payload)

    return checkpoint.CheckpointStore.of(root.parent).save(step, {"state": {"step": step}}, write, Ranks(), keep)


@pytest.mark.fault
def test_checkpoints_are_sealed_atomically_and_corrupt_ones_skipped(tmp_path, fault):
    root = tmp_path / "checkpoints"
    _write_checkpoint(root, 10)
    newest = _write_checkpoint(root, 20)
    assert checkpoint.latest_verified(root) == newest
    (newest / "state" / "rank0.pt").write_bytes(b"torn write")
    assert checkpoint.latest_verified(root).name == "step-00000010"
    (root / ".step-00000030.tmp").mkdir()  # a crash mid-save leaves only a hidden staging dir
    assert checkpoint.latest_verified(root).name == "step-00000010"
    assert json.loads((root / "step-00000010" / "manifest.json").read_text())["state"]["step"] == 10
    fault("corrupted", "the newest checkpoint's state file overwritten; a staging dir left by a crash", 2,
          "one checkpoint interval: resume picks the older checkpoint that verifies")


@pytest.mark.fault
def test_checkpoints_that_all_fail_their_manifests_are_named_not_trained_over(tmp_path, fault):
    root = tmp_path / "run" / "checkpoints"
    _write_checkpoint(root, 10)
    _write_checkpoint(root, 20)
    (root / "step-00000030" / "state").mkdir(parents=True)  # no manifest: a bucket upload a kill cut short
    (root / "step-00000020" / "state" / "rank0.pt").write_bytes(b"torn write")
    (root / "step-00000010" / "state" / "rank0.pt").unlink()
    with pytest.raises(checkpoint.Unresumable) as err:
        checkpoint.latest_verified(root)
    message = str(err.value)
    assert message.startswith(f"{root.parent} cannot be resumed")
    assert "step-00000020: state/rank0.pt differs from its manifest" in message
    assert "step-00000010: state/rank0.pt is missing" in message and "step-00000030" not in message
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000020", "step-00000030"]
    fault("corrupted", "every checkpoint of a run fails its manifest (a file overwritten, a file deleted), beside "
          "one that was never committed", 1, "nothing: one message naming the run directory and each checkpoint's "
          "problem; no checkpoint deleted, no training from step 0 over them")


def test_a_staging_dir_sealed_again_lists_its_files_not_an_old_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    staging = root / ".step-00000010.tmp"
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text("{}")  # a kill after the manifest, before the rename
    sealed = _write_checkpoint(root, 10)
    assert checkpoint.verify(sealed)
    assert "manifest.json" not in checkpoint.read_meta(sealed)["files"]


def test_a_ray_failure_outside_the_workers_names_the_run_directory_not_ray_advice(tmp_path):
    from mmcore.train.fit import ray_failure

    ray_text = ("The actor died because of an error raised in its creation task, \x1b[36mray::TrainController."
                "__init__()\x1b[39m (pid=4913)\n  File \"controller.py\", line 9\nray.train.v2._internal.exceptions."
                "CheckpointManagerInitializationError: The run snapshot contains a reference to a checkpoint that "
                "does not exist anymore (x). You are running in a corrupted run directory. Please delete the "
                "existing folder.")
    message = str(ray_failure(RuntimeError(ray_text), tmp_path / "run"))
    assert message == (f"Ray Train could not run {tmp_path / 'run'}: ray.train.v2._internal.exceptions."
                       "CheckpointManagerInitializationError: The run snapshot contains a reference to a checkpoint "
                       "that does not exist anymore (x)")


def test_prune_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _write_checkpoint(root, step)
    (root / ".step-00000040.tmp").mkdir()
    checkpoint.CheckpointStore.of(root.parent).prune(keep=2)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000030", "step-00000020"]
    assert not (root / ".step-00000040.tmp").exists()


def test_step_guard_skips_then_stops():
    guard = StepGuard(max_bad=3)
    assert guard.check(True, 1)
    assert not guard.check(False, 2) and not guard.check(False, 2)
    assert guard.check(True, 2) and guard.total == 2
    guard.check(False, 3)
    guard.check(False, 3)
    with pytest.raises(NonFiniteLoss, match="3 micro-batches in a row at step 3"):
        guard.check(False, 3)


def test_progress_listeners_see_every_bar_until_their_block_ends():
    from mmcore.progress import progress_bar, progress_listener

    seen = []
    with progress_listener(lambda *update: seen.append(update)):
        with progress_bar("downloading", total=3) as advance_to:
            advance_to(2)
            advance_to(5)  # clamped to the total
    with progress_bar("filtering", total=1) as advance_to:
        advance_to(1)
    assert seen == [("downloading", 0, 3), ("downloading", 2, 3), ("downloading", 3, 3)]


def test_a_run_is_named_by_its_config_and_architecture_not_by_where_it_runs():
    from mmcore.models import model_config
    from mmcore.train.plan import run_name

    cfg, arch = recipe("debug", "/data/v1"), model_config("clip-debug")
    name = run_name(cfg, "ds123456789", arch)
    assert name.startswith("debug-contrastive-ds123456-")
    elsewhere = recipe("debug", "/data/v1")
    elsewhere.cluster.address, elsewhere.tracking.uri = "ray://head:10001", "http://mlflow:5000"
    assert run_name(elsewhere, "ds123456789", arch) == name  # re-run on a cluster: resumes the same run
    wider = {**arch, "vision": {**arch["vision"], "width": 64}}
    assert run_name(cfg, "ds123456789", wider) != name  # an edited architecture is a new run
    assert run_name(dataclasses.replace(cfg, seed=cfg.seed + 1), "ds123456789", arch) != name


def test_a_config_field_added_by_an_upgrade_keeps_the_run_name_until_it_is_set():
    """A run killed before an upgrade that adds a config field resumes after it: the name hashes the fields that
    differ from their defaults (an optimizer section with one more field stands in for the new version's)."""
    from mmcore.config import OptimConfig
    from mmcore.models import model_config
    from mmcore.train.plan import run_name

    cfg, arch = recipe("demo", "/data/v1"), model_config("clip-demo")
    Upgraded = dataclasses.make_dataclass("OptimConfig", [("new_switch", bool, dataclasses.field(default=False))],
                                          bases=(OptimConfig,))
    upgraded = dataclasses.replace(cfg, optim=Upgraded(**dataclasses.asdict(cfg.optim)))
    assert run_name(upgraded, "ds123456789", arch) == run_name(cfg, "ds123456789", arch)
    upgraded.optim.new_switch = True
    assert run_name(upgraded, "ds123456789", arch) != run_name(cfg, "ds123456789", arch)


class _Stored:
    """What pin_parents reads of a dataset version: its id and the stored image size."""

    id = "0123456789abcdef"
    manifest = {"config": {"download": {"image_size": 32}}}


@pytest.mark.parametrize("name, arch", [("demo-tokenizer", "vq-demo"), ("demo", "clip-demo")])
def test_a_model_that_takes_larger_images_than_the_dataset_stores_is_refused(name, arch):
    from mmcore.models import model_config
    from mmcore.train.parents import pin_parents

    with pytest.raises(ValueError, match=f"model.name: {arch} takes 64-pixel images but dataset 0123456789abcdef "
                                         "stores 32-pixel ones"):
        pin_parents(recipe(name, "d"), model_config(arch), "sqlite:///unused.db", _Stored())
    assert pin_parents(recipe("debug-tokenizer", "d"), model_config("vq-debug"), "", _Stored()).tags == {}


def test_stages_that_build_on_a_parent_say_which_one_they_need():
    from mmcore.config import ModelConfig, TaskConfig

    for stage, kind in (("fusion", "contrastive"), ("unified", "image-tokenizer"), ("contrastive", "contrastive")):
        loss = "clip" if stage == "contrastive" else "next-token"
        cfg = _cfg(task=TaskConfig(stage=stage, loss=loss), model=ModelConfig(parent="runs/x"))
        with pytest.raises(ValueError, match=f"^model.parent: 'runs/x': the {stage} stage needs a registered {kind} "
                                             "model, e.g. models:/"):
            cfg.validate()
    lm = _cfg(task=TaskConfig(stage="image-tokenizer", loss="mse"), model=ModelConfig(lm_parent="models:/f@c"))
    with pytest.raises(ValueError, match="^model.lm_parent: the image-tokenizer stage does not start its LM from a "
                                         "registered model"):
        lm.validate()
    started = _cfg(model=ModelConfig(start_from="models:/mmpipe-contrastive@champion"))
    with pytest.raises(ValueError, match=r"^model.start_from: the contrastive stage does not start from a registered "
                                         r"model of its own \(model.parent fine-tunes one\)"):
        started.validate()
    packed = RunConfig(data=DataConfig(dataset="d", pack_length=96))  # a contrastive run has no questions
    with pytest.raises(ValueError, match="^data.pack_length: the contrastive stage does not pack questions"):
        packed.validate()


class _Version:
    """The two things work_units reads of a dataset version."""

    def __init__(self, root, shards):
        self.path, self.shards = root, shards
        self.manifest = {"splits": {"train": sum(pq_rows(p) for p in shards)}}

    def shard_paths(self, split):
        return self.shards if split == "train" else []


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path)).metadata.num_rows


def _shards(tmp_path):
    """Two shards of 10 and 6 rows, row groups of 4: caption i is the split's row i."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for name, rows in (("a", range(0, 10)), ("b", range(10, 16))):
        path = tmp_path / f"train-{name}.parquet"
        pq.write_table(pa.table({"caption": [str(i) for i in rows]}), path, row_group_size=4)
        paths.append(path)
    return _Version(tmp_path, paths)


def _read(units):
    from mmcore.data.units import read_row_groups

    columns = {key: [u[key] for u in units] for key in units[0]}
    table = read_row_groups(columns, ["caption"])
    return list(zip(table["epoch"].to_pylist(), table["sample"].to_pylist(), table["caption"].to_pylist()))


def test_the_train_order_is_a_function_of_seed_and_epoch_and_every_row_comes_once_per_epoch(tmp_path):
    from mmcore.data.units import work_units

    version = _shards(tmp_path)
    units = work_units(version, "train", epochs=3, seed=5)
    assert units == work_units(version, "train", epochs=3, seed=5)
    assert [u["rows"] for u in units[:5]] and sum(u["rows"] for u in units) == 3 * 16
    rows = _read(units)
    assert all(str(sample) == caption for _, sample, caption in rows), "a row's id is its index in the split"
    by_epoch = [[sample for epoch, sample, _ in rows if epoch == e] for e in range(3)]
    assert all(sorted(samples) == list(range(16)) for samples in by_epoch)
    assert by_epoch[0] != by_epoch[1] != by_epoch[2], "each epoch is shuffled anew (units and the rows in them)"
    assert _read(work_units(version, "train", epochs=1, seed=6)) != rows[:16]


def test_each_rank_streams_its_own_units_and_a_resume_starts_at_the_next_row(tmp_path):
    from mmcore.data.units import rank_units, work_units

    units = work_units(_shards(tmp_path), "train", epochs=2, seed=1)
    streams = [_read(rank_units(units, rank, 2)) for rank in range(2)]
    assert sorted(r for stream in streams for r in stream) == sorted(_read(units)), "the ranks share the rows out"
    for rank, stream in enumerate(streams):
        first = rank_units(units, rank, 2)[0]["rows"]
        for skip in (0, 3, first, 11):
            assert _read(rank_units(units, rank, 2, skip_rows=skip)) == stream[skip:]


def test_versions_mixed_by_weight_give_their_share_of_every_stretch_of_the_stream(tmp_path):
    """data.mix: a second version at weight 0.25 gives a quarter of the rows (to within a unit, 4 rows, at
    every point of the stream), its rows keep ids of their own, and one version alone is its work_units."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.data.units import train_units, work_units

    captions = _shards(tmp_path)
    (tmp_path / "chats").mkdir()
    path = tmp_path / "chats" / "train.parquet"
    pq.write_table(pa.table({"caption": [f"chat {i}" for i in range(12)]}), path, row_group_size=4)
    chats = _Version(tmp_path / "chats", [path])
    alone = [{**unit, "source": 0} for unit in work_units(captions, "train", 4, seed=2)]
    assert train_units([(captions, 1.0)], 40, seed=2) == alone
    units = train_units([(captions, 0.75), (chats, 0.25)], 200, seed=2)
    rows = _read(units)
    assert len(rows) >= 200
    for end in range(4, len(rows), 4):
        from_chats = sum(caption.startswith("chat") for _, _, caption in rows[:end])
        assert abs(from_chats - 0.25 * end) <= 4, (end, from_chats)
    ids = {caption: sample for _, sample, caption in rows}
    assert sorted(ids[f"chat {i}"] for i in range(12)) == list(range(16, 28)), "after the first version's 16 rows"
    assert train_units([(captions, 0.75), (chats, 0.25)], 200, seed=2) == units
    assert train_units([(captions, 1.0)], 40, seed=2, grain=2) == alone, "one version is not cut"


def test_a_mix_is_cut_into_slices_so_that_every_ranks_batches_hold_each_version(tmp_path):
    """Mixed by whole row groups, a batch came from one version (the unified stage read for 8 steps, then drew
    for 8); in slices of `grain` rows, dealt to the ranks version by version, every rank's every 4 rows hold 2
    of each, a row group's slices read its rows once each, and a resume goes on at the next row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.data.units import rank_units, train_units

    captions = _shards(tmp_path)
    (tmp_path / "chats").mkdir()
    path = tmp_path / "chats" / "train.parquet"
    pq.write_table(pa.table({"caption": [f"chat {i}" for i in range(12)]}), path, row_group_size=4)
    units = train_units([(captions, 0.5), (_Version(tmp_path / "chats", [path]), 0.5)], 64, seed=4, grain=2)
    assert {u["rows"] for u in units} == {2}
    for rank in range(2):
        stream = _read(rank_units(units, rank, 2))
        assert len(stream) >= 32
        for start in range(0, 32, 4):
            assert sum(caption.startswith("chat") for _, _, caption in stream[start: start + 4]) == 2, stream
        for skip in (1, 5):
            assert _read(rank_units(units, rank, 2, skip_rows=skip)) == stream[skip:]
    by_epoch = {}
    for epoch, sample, caption in _read(units):
        by_epoch.setdefault((caption.startswith("chat"), epoch), []).append(sample)
    assert sorted(by_epoch[(True, 0)]) == list(range(16, 28)) and sorted(by_epoch[(False, 0)]) == list(range(16))


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_an_even_share_whatever_the_row_groups(tmp_path, world):
    """A split of a 256-row group and a 3-row one, dealt every world-th unit, gave one rank of two the
    3-row group in every epoch for some seeds: 12 rows in 4 epochs, less than one batch, and it spun."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.data.units import rank_units, work_units

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"caption": [str(i) for i in range(259)]}), path, row_group_size=256)
    for seed in range(4):
        units = work_units(_Version(tmp_path, [path]), "train", epochs=4, seed=seed)
        shares = [rank_units(units, rank, world) for rank in range(world)]
        rows = [sum(u["rows"] for u in share) for share in shares]
        assert max(rows) - min(rows) <= 256, rows
        dealt = sorted((u["epoch"], u["row_group"]) for share in shares for u in share)
        assert dealt == sorted((u["epoch"], u["row_group"]) for u in units), "every unit goes to one rank"


def test_an_endless_stream_without_a_whole_batch_is_an_error_not_a_spin():
    """A rank whose share of the train split is smaller than one batch got no batch from any pass and
    restarted the pass forever (a 3-row share of a 259-row split, batch 16)."""
    import torch

    from mmcore.data.stream import torch_batches

    class Shard:  # three rows: no whole batch of 16 with drop_last
        def iter_torch_batches(self, batch_size, drop_last, device):
            return iter(())

    with pytest.raises(ValueError, match="fewer rows than one batch of 16"):
        next(torch_batches(Shard(), 16, torch.device("cpu")))



def test_the_finiteness_check_reads_a_zero3_partition_without_its_padding(monkeypatch):
    """ZeRO-3 pads the last partitions of a parameter with uninitialised memory, which can hold NaN bit
    patterns: a healthy two-node run was refused a checkpoint ("parameters are not finite") at random."""
    import torch

    from mmcore.train import trainer as loop

    param = torch.nn.Parameter(torch.arange(7.0))  # 7 values in partitions of 4: rank 1 holds 3 and 1 of padding
    param.ds_numel = 7
    param.ds_tensor = torch.tensor([4.0, 5.0, 6.0, float("nan")])
    param.ds_tensor.ds_numel = 4
    monkeypatch.setattr(loop.dist, "get_rank", lambda group=None: 1)
    assert loop.held_values(param).tolist() == [4.0, 5.0, 6.0]
    param.ds_tensor[1] = float("inf")
    assert not torch.isfinite(loop.held_values(param)).all(), "a value the rank holds is still checked"
    monkeypatch.setattr(loop.dist, "get_rank", lambda group=None: 0)
    param.ds_tensor = torch.tensor([0.0, 1.0, 2.0, 3.0])
    param.ds_tensor.ds_numel = 4
    assert loop.held_values(param).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert loop.held_values(torch.nn.Parameter(torch.ones(2))).tolist() == [1.0, 1.0], "without ZeRO-3: all of it"


def test_every_stage_record_names_what_exists():
    """A stage is one record (mmcore/stages.py): its Task, families, parent, recipe and primary metric must all
    be there, and its default recipe must train it."""
    import mmcore.eval.run  # noqa: F401 - registers every suite
    from mmcore.eval.suites import SUITES
    from mmcore.models import FAMILIES
    from mmcore.stages import STAGES

    for name, stage in STAGES.items():
        assert stage.task.__name__ == stage.task_name and set(stage.families) <= set(FAMILIES)
        cfg = recipe(stage.recipe, "d")
        assert cfg.task.stage == name and cfg.task.loss in stage.losses
        assert stage.primary.split(".")[0] in SUITES, stage.primary
        assert stage.parent is None or stage.parent.stage in STAGES
