"""Does torch.compile pay for generation? A registered fusion model captions the test split's images, greedy with
its KV cache, as evaluation's captioning and `mmpipe infer --output captions` ask, eagerly and with its LM's step
compiled (inductor, dynamic shapes: the cache grows by one position a token), each in a fresh process; the
compiled run is timed with its compile (a command pays it once) and again warm; the captions must be the same.

    MMPIPE_HOME=/tmp/demo-s54 .venv/bin/python experiments/compile-generation/run.py \
        --model models:/mmpipe-fusion@champion --dataset /tmp/demo-s54/datasets/urls-...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import pyarrow.parquet as pq
import torch
from mmcore.data.dataset import DatasetVersion
from mmcore.data.instruct import CAPTION_PROMPT
from mmcore.models.encode import generate_answers
from mmcore.registry import load_model
model_uri, dataset, rows, compiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "compiled"
version = DatasetVersion.open(dataset)
images = [image for shard in version.shard_paths("test")
          for image in pq.read_table(shard, columns=["image"]).column("image").to_pylist()][:rows]
model, preprocess = load_model(model_uri)
if compiled:
    model.hidden = torch.compile(model.hidden, dynamic=True)
times, answers = [], None
for _ in range(2):  # the first with the compile, the second warm
    started = time.perf_counter()
    answers = generate_answers(model, preprocess, images, [CAPTION_PROMPT] * len(images),
                               max_new_tokens=preprocess.cfg.context_length)
    times.append(time.perf_counter() - started)
print(json.dumps({"times": times, "answers": answers, "threads": torch.get_num_threads()}))
"""


def run(model: str, dataset: str, rows: int, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, dataset, str(rows), variant], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    eager, compiled = (run(args.model, args.dataset, args.rows, v) for v in ("eager", "compiled"))
    same = sum(a == b for a, b in zip(eager["answers"], compiled["answers"]))
    print(f"{args.rows} captions, {eager['threads']} threads")
    print("| | first call s (compile included) | warm call s | captions/s warm |")
    print("|---|---|---|---|")
    for name, r in (("eager", eager), ("compiled", compiled)):
        print(f"| {name} | {r['times'][0]:.1f} | {r['times'][1]:.1f} | {args.rows / r['times'][1]:.1f} |")
    print(f"compiled / eager captions/s: warm {eager['times'][1] / compiled['times'][1]:.2f}, "
          f"first call {eager['times'][0] / compiled['times'][0]:.2f}; same captions: {same} of {args.rows}")


if __name__ == "__main__":
    main()
