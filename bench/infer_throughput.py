"""Batch inference against a plain loop: `mmpipe infer --output clip-score` over a dataset version (Ray Data
actors, a derived version written) and the same registered model in the loop a user would write in one process
(every shard read, images and captions embedded in batches of 256 at torch's threads, the scores kept in
memory), on the same rows, in one run; each timed from loading the model to the last score, the median of
--repeats. Writes docs/benchmarks.md ("Batch inference").

    MMPIPE_HOME=~/.mmpipe .venv/bin/python bench/infer_throughput.py --dataset DIR \\
        --model models:/mmpipe-contrastive@champion
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, pinned_model, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a caption dataset version")
    parser.add_argument("--model", required=True, help="a registered contrastive model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from mmcore import storage
    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.derived import Derivation, derived_path
    from mmcore.data.filters import ModelScoreFilter
    from mmcore.infer import infer
    from mmcore.registry import load_model

    version = DatasetVersion.open(args.dataset)
    rows = version.manifest["rows"]["kept"]
    model_uri = pinned_model(args.model)
    ours, loop = [], []
    for _ in range(args.repeats):
        storage.remove_tree(derived_path(version, Derivation("clip-score", model_uri, Path("."))))  # computed anew
        _, seconds = infer(model_uri, args.dataset, "clip-score")
        ours.append(rows / seconds)
        started = time.perf_counter()
        model, preprocess = load_model(model_uri)
        score = ModelScoreFilter(model, preprocess)
        scores = [score.scores(pq.read_table(str(path), columns=["image", "caption"]))
                  for path in version.shard_paths()]
        assert sum(len(s) for s in scores) == rows
        loop.append(rows / (time.perf_counter() - started))
    ratio = median(ours) / median(loop)
    command = (f"MMPIPE_HOME={os.environ.get('MMPIPE_HOME', '~/.mmpipe')} .venv/bin/python bench/infer_throughput.py "
               f"--dataset {args.dataset} --model {args.model} --repeats {args.repeats}")
    body = "\n".join([
        "## Batch inference: `mmpipe infer` against a plain loop", "",
        f"Command: `{command}` ({model_uri}, dataset {version.id}: {rows} rows; median of {args.repeats}).", "",
        "| | rows/s |", "|---|---|",
        f"| `mmpipe infer --output clip-score` (Ray Data actors, a derived version written) | {median(ours):.0f} |",
        f"| a plain loop in one process (torch's threads, batches of 256, nothing written) | {median(loop):.0f} |",
        f"| ratio | **{ratio:.2f}** |"])
    write_section("batch-inference", body)
    print(body)


if __name__ == "__main__":
    main()
