"""Run the fault suite and write docs/reliability.md: each promise, the fault injected, tries, outcome, loss.

    .venv/bin/python bench/reliability.py           # the fast part (also in `make test`), ~10 min on 2 cores
    .venv/bin/python bench/reliability.py --long    # and the long part (repeated kills, minutes of downtime)

Every fault test is marked `fault` (the long ones also `long`) and reports, through the `fault`
fixture of tests/conftest.py, which promise it checks, what it injected, how many times, and what
was lost; the outcome is pytest's. A promise no test checks yet is listed as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"

PROMISES = {
    "worker-killed": "A training worker killed (SIGKILL): the run finishes from the newest checkpoint that verifies",
    "driver-killed": "The driver killed and the same command run again: it resumes; a finished run is not trained again",
    "tree-killed": "The whole process tree (driver, Ray, workers) killed at any moment and the same command run "
                   "again: it resumes from the newest checkpoint that verifies and registers the model once",
    "two-nodes": "A worker on the second node of a two-node cluster killed, dataset and checkpoints in a bucket: "
                 "the run resumes from the bucket",
    "mlflow-down": "MLflow down in the middle of a run: no metric lost; registration waits, then fails clearly",
    "prefect-restarted": "The Prefect API restarted in the middle of a flow run: no finished work repeated",
    "disk-full": "A full disk during ingest or checkpointing: a clear error naming the path, nothing half-written",
    "corrupted": "A corrupted shard or checkpoint: named before any training step; resume skips the checkpoint",
    "bucket": "Object storage that fails (an ingest crash, a missing bucket, refused credentials, an endpoint "
              "down): one clear error before any work; nothing counts without its manifest",
    "hostile-web": "A misbehaving web server (resets, tarpits, redirect loops): ingest ends, each row counted",
    "exactly-once": "Exactly-once data on resume: the rows behind a resumed model are the uninterrupted run's",
    "load-flows": "20 flow runs submitted at once through the Prefect API: all complete, none lost or run twice",
    "load-rows": "Ingest of a 100,000-row URL list: finishes, memory bounded, counts add up",
    "no-unpickle": "Loading from the registry never unpickles; paths cannot leave the model's directory",
    "auth": "`mmpipe up --host` off loopback refuses to start without authentication on every server",
    "secrets": "Secrets never reach MLflow params, Prefect parameters, logs or artifacts",
    "bad-input": "At least 20 kinds of malformed URL lists, configs and flow parameters: a clear error each",
}


def run_suite(long: bool, xml: Path) -> float:
    marker = "fault" if long else "fault and not long"
    command = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", f"--junitxml={xml}"]
    print("$", shlex.join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=False)
    return time.perf_counter() - started


def read_results(xml: Path) -> list[dict]:
    rows = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None \
            else "skipped" if case.find("skipped") is not None else "passed"
        test = f"{case.get('classname')}::{case.get('name')}"
        props = [(prop.get("name"), prop.get("value")) for prop in case.iter("property")]
        reports = [json.loads(value) for name, value in props if name == "fault"]
        if not reports and ("fault_test", "1") in props:  # failed before it could say what it did
            reports = [{"item": "unreported", "injected": "", "tries": 0, "lost": "unknown: the test failed first"}]
        rows += [{**report, "test": test, "outcome": outcome} for report in reports]
    return rows


def render(rows: list[dict], args, seconds: float) -> str:
    lines = ["# Reliability", "",
             "Every figure here was written by the command below; re-run it to refresh this file.", "",
             f"Command: `.venv/bin/python bench/reliability.py{' --long' if args.long else ''}` "
             f"({'fast and long parts' if args.long else 'the fast part; the long part: add --long'}), "
             f"{seconds / 60:.1f} min.", "",
             "| promise | test | fault injected | tries | outcome | lost |", "|---|---|---|---|---|---|"]
    for key, promise in PROMISES.items():
        mine = [r for r in rows if r["item"] == key]
        for row in mine:
            test = row["test"].removeprefix("tests.").replace(".", "/", 1)
            lines.append(f"| {promise} | `{test}` | {row['injected']} | {row['tries']} | {row['outcome']} | "
                         f"{row['lost']} |")
        if not mine:
            lines.append(f"| {promise} | none yet | | | not measured | |")
    for row in (r for r in rows if r["item"] == "unreported"):
        lines.append(f"| (failed before reporting its fault) | `{row['test']}` | | | {row['outcome']} | {row['lost']} |")
    unknown = sorted({r["item"] for r in rows} - set(PROMISES) - {"unreported"})
    if unknown:
        raise SystemExit(f"fault tests report promises this script does not list: {unknown}")
    lines += ["", f"_Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, Python {platform.python_version()}; "
              f"{sum(r['outcome'] == 'passed' for r in rows)} of {len(rows)} fault tests passed._", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also the long part of the fault suite")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        seconds = run_suite(args.long, xml)
        rows = read_results(xml)
    text = render(rows, args, seconds)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
