"""A real two-node Ray cluster on loopback: `ray start --head` and `ray start --address` as separate processes,
token auth on, dataset and checkpoints in a bucket (tests/objectstore.py), ZeRO-3 with activation checkpointing,
one node's worker killed once after a byte of its newest checkpoint was flipped."""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mmcore import storage
from mmcore.data.dataset import MANIFEST
from mmcore.bundle import ModelBundle
from mmcore.train import checkpoint
from tests.integration.workers import train_workers
from tests.objectstore import free_port

pytestmark = pytest.mark.integration


def _ray_start(*args, env) -> subprocess.Popen:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray, "start", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                             "--dashboard-agent-listen-port", "0", "--disable-usage-stats", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _alive_nodes(address: str) -> int:
    """Nodes the cluster counts as alive, asked by a client process that holds the token."""
    code = f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """(address, head process, second node's process); the token is in the environment of every process
    started from here on, as on a cluster (Ray reads it when it is imported: the driver is a `mmpipe train`)."""
    import ray

    ray.shutdown()  # the session's local Ray, if any; fit() starts a new one for later tests
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    # As `mmpipe up` starts its head: no 30 s drain of each node on SIGTERM (it waits for Ray Serve's
    # replicas; this cluster has none).
    monkeypatch.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = _ray_start("--head", "--port", str(port), "--temp-dir", f"/tmp/mmpipe-2n-{uuid.uuid4().hex[:6]}",
                      "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(free_port()), env=dict(os.environ))
    second = None
    deadline = time.monotonic() + 180
    try:
        while _alive_nodes(address) < 1:
            assert head.poll() is None and time.monotonic() < deadline, "the head node did not start"
            time.sleep(1)
        second = _ray_start("--address", address, env=dict(os.environ))
        while _alive_nodes(address) < 2:
            assert second.poll() is None and time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        yield address, head, second
    finally:
        nodes = [node for node in (second, head) if node is not None]
        for node in nodes:
            node.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes in order
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def _descendants(process: subprocess.Popen) -> set[int]:
    return {child.pid for child in psutil.Process(process.pid).children(recursive=True)}


@pytest.mark.fault
def test_zero3_on_two_ray_nodes_with_a_bucket_survives_a_killed_worker_and_a_corrupted_checkpoint(train_dataset, two_nodes, object_store,
                                                                       mmpipe_home, fault):
    address, head, second = two_nodes
    bucket = object_store.bucket()
    data = f"{bucket}/datasets/train"
    storage.upload_tree(train_dataset.path, storage.path(data), last=MANIFEST)
    mmpipe = str(Path(sys.executable).with_name("mmpipe"))
    command = [
        mmpipe, "train", "contrastive", "--recipe", "debug", "--dataset", data, "--ray-address", address,
        "--set", "optim.max_steps=120", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5",
        "--set", "checkpoint.every_steps=30", "--set", "checkpoint.max_failures=1", "--set", "parallel.zero_stage=3",
        "--set", "parallel.activation_checkpointing=true", "--set", f'cluster.storage_path="{bucket}/runs"',
        "--set", 'cluster.placement_strategy="SPREAD"', "--set", 'tracking.model_name="mmpipe-two-nodes-test"']
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = storage.path(f"{bucket}/runs")
    deadline = time.monotonic() + 600
    while not list(runs.glob("*/checkpoints/step-00000060/manifest.json")):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read() if driver.stderr else ""
        time.sleep(0.5)
    workers = train_workers()
    on_head, on_second = workers & _descendants(head), workers & _descendants(second)
    assert on_head and on_second, f"a training worker on each node: head {on_head}, second {on_second}"
    step60 = next(iter(runs.glob("*/checkpoints/step-00000060")))
    run_dir = step60.parents[1]
    killed_at = json.loads((run_dir / "progress.json").read_text())["step"]
    flipped = step60 / next(n for n in checkpoint.read_meta(step60)["files"] if "zero_pp_rank_1_" in n)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))  # the newest checkpoint no longer verifies: resume must skip it
    os.kill(min(on_second), signal.SIGKILL)
    out, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err

    result = json.loads((run_dir / "result.json").read_text())
    assert f'"run_dir": "{run_dir}"' in out, out
    assert result["metrics"]["resumed_from"] == 30 and result["metrics"]["step"] == 120
    assert result["metrics"]["loss"] < 0.85 * math.log(32)
    assert not (mmpipe_home / "runs" / run_dir.name).exists(), "nothing of the run on a local disk"
    final = storage.download_tree(run_dir / "final", mmpipe_home / "two-nodes-final")
    model, _ = ModelBundle.at(final).load()
    assert all(p.numel() > 0 for p in model.parameters()), "ZeRO-3 partitions were gathered before saving"

    listed = checkpoint.read_meta(step60)["files"]
    assert {rank for rank in (0, 1) if any(f"zero_pp_rank_{rank}_" in name for name in listed)} == {0, 1}, \
        "each rank's own files, uploaded from its own node, are in the manifest"
    assert checkpoint.verify(step60), "step 60, written again after the resume, replaced the corrupted one"
    step90 = run_dir / "checkpoints" / "step-00000090"
    assert checkpoint.latest_verified(run_dir / "checkpoints") == step90
    (run_dir / "checkpoints" / "step-00000100" / "state" / "part").write_text("uploaded, never committed")
    wrong = run_dir / "checkpoints" / "step-00000110"
    (wrong / "state" / "part").write_text("bytes")
    (wrong / checkpoint.MANIFEST).write_text('{"step": 110, "files": {"state/part": "0000"}, "state": {}}')
    assert checkpoint.latest_verified(run_dir / "checkpoints") == step90, "no manifest or a wrong one: skipped"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished before" in again.stderr + again.stdout, again.stderr
    fault("two-nodes", "SIGKILL to the Ray Train worker on the second `ray start` node after the step-60 checkpoint "
          "was committed in the bucket (ZeRO-3, token auth)", 1,
          f"killed at step {killed_at}, resumed from the bucket at step 30 (step 60 corrupted, see below): "
          f"{killed_at - 30} steps trained again")
    fault("corrupted", "a byte flipped in rank 1's ZeRO-3 file of the newest checkpoint in the bucket (step 60), then a "
          "worker killed; after the run, a checkpoint without a manifest and one with a wrong one", 3,
          "one checkpoint interval: every rank downloaded step 60, found it differs from its manifest and skipped it; "
          "the run resumed from step 30 and wrote step 60 anew; the two bad ones were skipped too")
