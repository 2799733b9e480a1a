"""Where the unified stage's image codes are made: in the Ray Data step, or once into a derived dataset.

Runs the unified stage's preprocessing (data/mixed.py) on train row groups of a dataset version with
a registered image tokenizer and times its parts: decoding the images, encoding them to codes, and
building the token sequences. A derived, versioned token dataset would save only the encoding, once
per epoch, at the price of a second artifact to version, store and invalidate when the tokenizer
changes. Prints rows/s per data CPU with and without the encoding, to set against the trainers'
samples/s (the unified runs' logs).
Usage:
  python experiments/unified-codes/unified_codes.py --home HOME --dataset DIR [--tokenizer models:/mmpipe-image-tokenizer@candidate]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/common.py

from common import measured, median  # noqa: E402


def time_parts(mixed, version, groups: int) -> tuple[list[float], list[float], list[float]]:
    """Seconds per row to decode, to encode, and for the whole sample, over `groups` train row groups
    (after one that warms up: model build, tokenizer load)."""
    import pyarrow.parquet as pq

    decode, encode, total = [], [], []
    units = [(p, g) for p in version.shard_paths("train") for g in range(pq.ParquetFile(p).num_row_groups)]
    for index, (path, group) in enumerate(units[: groups + 1]):
        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(group, columns=[c for c in mixed.columns if c in parquet.schema_arrow.names])
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        started = time.perf_counter()
        pixels = mixed.batch_pixels(batch["image"])
        decoded = time.perf_counter()
        mixed.codes(pixels)
        encoded = time.perf_counter()
        mixed(batch)
        done = time.perf_counter()
        if index:
            decode.append((decoded - started) / table.num_rows)
            encode.append((encoded - decoded) / table.num_rows)
            total.append((done - encoded) / table.num_rows)
    return decode, encode, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--tokenizer", default="models:/mmpipe-image-tokenizer@candidate")
    parser.add_argument("--groups", type=int, default=6, help="row groups timed (256 rows each)")
    parser.add_argument("--trainers", type=float, default=75.0,
                        help="samples/s the unified trainers consume (a demo-unified fit's log; default %(default)s)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home

    import torch
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from mmcore.config import TrackingConfig
    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.mixed import MixedPreprocessor
    from mmcore.models import architecture, build_model_for, model_config
    from mmcore.tasks import UnifiedTask
    from mmcore.tracking import resolve_uri
    from mmcore.registry import model_files

    torch.set_num_threads(1)  # one data CPU, as a Ray Data task has
    version = DatasetVersion.open(args.dataset)
    files = model_files(args.tokenizer, resolve_uri(TrackingConfig()))
    config = architecture(json.loads(Path(files.config).read_text()))
    arch = {**model_config("unified-demo"), "image_tokenizer": config}
    tokenizer_json = UnifiedTask.tokenizer(version.tokenizer_path.read_text(), arch)
    _, pre = build_model_for(arch, Tokenizer.from_str(tokenizer_json))
    mixed = MixedPreprocessor(pre, tokenizer_json, {"config": config, "state": load_file(files.weights)})
    decode, encode, total = time_parts(mixed, version, args.groups)
    per_row = median(total)
    without = per_row - median(encode)
    keeps_up = 1 / per_row > args.trainers
    verdict = (f"One data CPU makes {1 / per_row:.0f} samples/s with the encoding; the demo's two trainers consume "
               f"about {args.trainers:.0f} (a demo-unified fit), so "
               + ("the codes are made in the Ray Data step: the trainers do not wait on it, and a derived token "
                  "dataset would only move the encoding to a one-off pass, at the price of a second artifact to "
                  "version and to invalidate whenever the tokenizer is retrained."
                  if keeps_up else "the encoding is a bottleneck here: a derived token dataset would pay off.")
               + f" Where the data CPUs are also the trainers' (2 cores here), the encoding still takes about "
                 f"{args.trainers * median(encode):.0%} of a core from them at that rate: the price of not versioning "
                 "a second dataset.")
    body = f"""## Unified stage: image codes in the Ray Data step

`python experiments/unified-codes/unified_codes.py --home HOME --dataset DIR --tokenizer {args.tokenizer}`: the unified
stage's preprocessing of {len(total)} train row groups on one CPU thread (a Ray Data task's share),
image tokenizer `{config['channels']}` / levels `{config['levels']}`.

| per data CPU | ms per row | rows/s |
|---|---|---|
| decode the stored image | {1000 * median(decode):.2f} | {1 / median(decode):.0f} |
| encode it to codes (the tokenizer's encoder) | {1000 * median(encode):.2f} | {1 / median(encode):.0f} |
| the whole sample (decode, encode, sequence) | {1000 * per_row:.2f} | **{1 / per_row:.0f}** |
| the same with codes read from a derived dataset | {1000 * without:.2f} | {1 / without:.0f} |

{verdict}

{measured()}"""
    print(body)


if __name__ == "__main__":
    main()
