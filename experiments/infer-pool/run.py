"""Batch inference's actor pool on a small machine: rows/s of `infer --output clip-score` for pool shapes (the local
Ray's logical CPUs x the CPUs, and torch threads, each actor holds) against the plain loop, each in a fresh process.

    MMPIPE_HOME=/tmp/datacomp .venv/bin/python experiments/infer-pool/run.py \
        --dataset /tmp/datacomp/datasets/noisy-seed1 --model models:/datacomp-yesterday/1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SHAPES = [(4, 1), (2, 1), (2, 2), (4, 2)]
"""(the local Ray's logical CPUs, each actor's CPUs and threads); (4, 1) was the default."""

CHILD = """
import json, sys, time
from pathlib import Path
ray_cpus, actor_cpus, dataset, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
from mmcore import storage
from mmcore.data import stream
from mmcore.data.dataset import DatasetVersion
from mmcore.data.derived import Derivation, derived_path
from mmcore.infer import infer
from mmcore.train.fit import connect_ray
version = DatasetVersion.open(dataset)
rows = version.manifest["rows"]["kept"]
if ray_cpus:
    storage.remove_tree(derived_path(version, Derivation("clip-score", model, Path("."))))
    connect_ray(num_cpus=ray_cpus)
    stream.ACTOR_CPUS = actor_cpus
    _, seconds = infer(model, dataset, "clip-score")
else:  # the plain loop a user would write
    import pyarrow.parquet as pq
    from mmcore.data.filters import ModelScoreFilter
    from mmcore.registry import load_model
    started = time.perf_counter()
    score = ModelScoreFilter(*load_model(model))
    for path in version.shard_paths():
        score.scores(pq.read_table(str(path), columns=["image", "caption"]))
    seconds = time.perf_counter() - started
print(json.dumps({"rows_per_s": rows / seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True, help="pinned: models:/name/version")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for _ in range(args.repeats):
        for shape in [(0, 0), *SHAPES]:
            out = subprocess.run([sys.executable, "-c", CHILD, *map(str, shape), args.dataset, args.model],
                                 capture_output=True, text=True, check=True).stdout
            results.setdefault(shape, []).append(json.loads(out.strip().splitlines()[-1])["rows_per_s"])
            print(shape, results[shape], flush=True)
    loop = statistics.median(results[(0, 0)])
    print("| local Ray CPUs | actor CPUs = threads | actors | rows/s (median) | / plain loop |")
    print("|---|---|---|---|---|")
    print(f"| plain loop | - | - | {loop:.0f} | 1.00 |")
    for ray_cpus, actor_cpus in SHAPES:
        rate = statistics.median(results[(ray_cpus, actor_cpus)])
        print(f"| {ray_cpus} | {actor_cpus} | {ray_cpus // actor_cpus} | {rate:.0f} | {rate / loop:.2f} |")


if __name__ == "__main__":
    main()
