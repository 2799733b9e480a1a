"""The long part of the fault suite (bench/reliability.py --long): repeated kills, a killed driver, minutes
of MLflow downtime. Deselected in `make test` (marker `long`); every fault is real: SIGKILL, a stopped server."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmcore.cli import apply_overrides
from mmcore.models import model_config
from mmcore.recipes import recipe
from mmcore.train import checkpoint
from mmcore.train.plan import run_name
from tests.integration.conftest import debug_config
from tests.integration.workers import fit_with_kills, mmpipe_process, reported_step

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.long]

EVERY = 20  # checkpoint interval of these runs


def _run_dir(cfg, dataset, home: Path) -> Path:
    return home / "runs" / run_name(cfg, dataset.id, model_config(cfg.model.name))


def _at_step(step: int):
    return lambda run_dir: reported_step(run_dir) >= step


def _staging_after(step: int):
    """True while a checkpoint after `step` is being written (its staging dir exists, not yet renamed)."""
    return lambda run_dir: reported_step(run_dir) >= step and any((run_dir / "checkpoints").glob(".step-*.tmp"))


def _final_save(run_dir: Path) -> bool:
    """The final bundle being written, or (if that is too quick to see) the last step reported."""
    return (run_dir / ".final.tmp").exists() or reported_step(run_dir) >= 120


def test_a_run_survives_five_worker_kills_at_seeded_points(trained, train_dataset, local_ray, mmpipe_home, fault):
    rng = random.Random(13)
    cfg = debug_config(train_dataset, f"checkpoint.every_steps={EVERY}", "checkpoint.max_failures=6",
                       'tracking.model_name="mmpipe-five-kills"')
    run_dir = _run_dir(cfg, train_dataset, mmpipe_home)
    points = [rng.randint(5, 18), rng.randint(45, 58), rng.randint(85, 98)]
    triggers = [(f"at step {points[0]}", _at_step(points[0])),
                ("mid-checkpoint (staging dir written, not renamed)", _staging_after(30)),
                (f"at step {points[1]}", _at_step(points[1])), (f"at step {points[2]}", _at_step(points[2])),
                ("during the final save", _final_save)]
    result, kills = fit_with_kills(cfg, run_dir, triggers)

    assert result.metrics["step"] == 120 and result.model_version == "1"
    sealed = checkpoint.checkpoints(run_dir / "checkpoints")
    assert sealed and all(checkpoint.verify(path) for path in sealed)
    assert not list((run_dir / "checkpoints").glob(".step-*.tmp")), "no staging dir outlives the run"
    reference = trained.metrics["val_loss"]  # the same recipe and data order without a kill
    assert abs(result.metrics["val_loss"] - reference) <= 0.15 * reference
    # The rows behind the model are the uninterrupted run's, as in the one-kill test.
    for rank in range(2):
        ours = (run_dir / "samples" / f"rank-{rank}.tsv").read_text()
        assert ours == (Path(trained.run_dir) / "samples" / f"rank-{rank}.tsv").read_text()
    fault("worker-killed", "SIGKILL to a Ray Train worker 5 times in one run: " + "; ".join(
        f"{label} (step {step})" for label, step in kills), len(kills),
        f"by design at most one checkpoint interval ({EVERY} steps) trained again per kill (not measured per "
        f"kill); the same rows as without kills; final val loss "
        f"{result.metrics['val_loss']:.3f} against {reference:.3f} without kills (tolerance 15%)")


def test_a_killed_driver_resumes_when_the_same_command_runs_again(train_dataset, tmp_path, fault):
    home = tmp_path / "home"
    overrides = ["optim.max_steps=120", f"checkpoint.every_steps={EVERY}", "optim.warmup_steps=5"]
    command = ["train", "contrastive", "--recipe", "debug", "--dataset", str(train_dataset.path),
               *(arg for item in overrides for arg in ("--set", item))]
    cfg = apply_overrides(recipe("debug", str(train_dataset.path)), overrides)  # as the command makes it
    run_dir = _run_dir(cfg, train_dataset, home)

    driver = mmpipe_process(home, *command)
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step-00000040")):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.2)
    killed_at = reported_step(run_dir)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, as a closed terminal would
    driver.wait()

    again = mmpipe_process(home, *command)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"]["step"] == 120 and result["metrics"]["resumed_from"] >= 40, output

    started = time.monotonic()
    third = mmpipe_process(home, *command)
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and f"run {run_dir.name} finished before" in output, output
    assert "training " not in output, "a finished run is not trained again"
    fault("driver-killed", "SIGKILL to the process group of `mmpipe train` after the step-40 checkpoint; the same "
          "command run twice more", 1, f"killed at step {killed_at}, resumed from step "
          f"{result['metrics']['resumed_from']}; the third run returned the registered model in "
          f"{time.monotonic() - started:.0f} s without training")


@pytest.fixture
def stack_home(tmp_path):
    from pipelines import stack
    from tests.integration.test_stack import free_ports

    home = tmp_path.resolve()
    stack.up(home, ports=free_ports(), timeout_s=180)
    yield home
    stack.down(home)


def _points(uri: str, run_id: str) -> set[tuple[str, int]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def test_mlflow_down_for_a_minute_mid_run_loses_no_metric(train_dataset, local_ray, stack_home, fault):
    from pipelines import services, stack
    from mmcore.train.fit import fit

    uri = services.read_state(stack_home)["urls"]["mlflow_ui"]
    base = [f"checkpoint.every_steps={EVERY}", f'tracking.uri="{uri}"', "data.record_samples=false"]
    clean = fit(debug_config(train_dataset, *base, "seed=2", 'tracking.model_name="mmpipe-mlflow-clean"'))

    cfg = debug_config(train_dataset, *base, "seed=3", 'tracking.model_name="mmpipe-mlflow-down"')
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    thread.start()
    runs = Path(os.environ["MMPIPE_HOME"]) / "runs"
    run_dir = runs / run_name(cfg, train_dataset.id, model_config(cfg.model.name))
    while reported_step(run_dir) < 20:
        assert thread.is_alive()
        time.sleep(0.2)
    mlflow = services.read_state(stack_home)["services"]["mlflow"]
    os.killpg(mlflow["pgid"], signal.SIGKILL)
    down_at = reported_step(run_dir)
    time.sleep(60)
    stack.up(stack_home)
    thread.join(timeout=600)
    result = outcome["result"]

    assert result.model_version == "1"
    assert result.metrics["tracking_failures"] >= 1 and result.metrics["tracking_lost"] == 0
    assert _points(uri, result.mlflow_run_id) == _points(uri, clean.mlflow_run_id), "the same metric points"
    fault("mlflow-down", f"SIGKILL to the MLflow server of `mmpipe up` at step {down_at} of 120, restarted 60 s later",
          1, f"0 metric points ({len(_points(uri, clean.mlflow_run_id))} logged, as in a run without the fault; "
          f"{result.metrics['tracking_failures']:.0f} failed sends kept and resent); the model registered")


def _ingest_peak(url_list: Path, out: Path, home: Path) -> tuple[dict, float, float]:
    """`mmpipe ingest` in a process of its own: (manifest rows, peak RSS in MiB of the ingest process and of any
    process it started, seconds)."""
    script = ("import json, resource, subprocess, sys, time\n"
              "started = time.monotonic()\n"
              "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
              "print(json.dumps({'rc': done.returncode, 'out': done.stdout[-2000:] + done.stderr[-2000:],\n"
              "                  'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,\n"
              "                  'seconds': time.monotonic() - started}))\n")
    cli = str(Path(sys.executable).with_name("mmpipe"))
    env = {**os.environ, "MMPIPE_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", script, cli, "ingest", str(url_list), "--out", str(out),
                           "--allow-network", "127.0.0.1/32"], capture_output=True, text=True, env=env,
                          timeout=3600)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["out"]
    return json.loads((out / "manifest.json").read_text())["rows"], report["peak_kib"] / 1024, report["seconds"]


def test_a_100k_row_url_list_ingests_in_bounded_memory_and_every_row_is_counted(served_dir, tmp_path, fault):
    """The loopback server serves 400 images under 100,000 URLs (a query string makes each URL distinct).
    Peak RSS of the 100,000-row ingest may exceed a 10,000-row one's by less than 1 KiB a row: the list itself
    is held as Arrow columns (about 0.3 KiB a row here, with its 11 extra columns); the rest is the same
    (the language detector's models, about 370 MiB, vary by tens of MiB from run to run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.data.synthetic.corpus import SampleSpec, make_sample

    server, root = served_dir
    base = pq.read_table(make_sample(root / "load", f"{server.url}/load",
                                     SampleSpec(synthetic=400, digits=0, photos=False, defects=False, seed=9)))
    peaks, rows = {}, {}
    for n in (10_000, 100_000):
        copies = [i % base.num_rows for i in range(n)]
        table = base.take(copies)
        urls = [f"{url}?copy={i}" for i, url in enumerate(table.column("url").to_pylist())]
        table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls))
        url_list = tmp_path / f"urls-{n}.parquet"
        pq.write_table(table, url_list)
        rows[n], peaks[n], seconds = _ingest_peak(url_list, tmp_path / f"v-{n}", tmp_path / "home")
        assert rows[n]["in"] == n and rows[n]["kept"] + sum(rows[n]["rejected"].values()) == n, rows[n]
    per_row = (peaks[100_000] - peaks[10_000]) * 1024 / 90_000
    assert per_row < 1.0, f"peak RSS grows {per_row:.2f} KiB a row with the list: {peaks}"
    kept, rejected = rows[100_000]["kept"], rows[100_000]["rejected"]
    fault("load-rows", "a 100,000-row URL list (400 images under distinct URLs) from the loopback server, and a "
          "10,000-row one for comparison", 1,
          f"nothing: {kept:,} kept + {sum(rejected.values()):,} rejected ({', '.join(f'{k} {v:,}' for k, v in sorted(rejected.items()))}) "
          f"= 100,000 in {seconds / 60:.1f} min; peak RSS {peaks[100_000]:.0f} MiB against {peaks[10_000]:.0f} MiB "
          f"for 10,000 rows ({per_row:.2f} KiB more a row)")
