"""Batch inference against a plain loop: `mmpipe infer --output clip-score` over a dataset version (Ray Data
actors, a derived version written) and the same registered model in the loop a user would write in one process
(every shard read, images and captions embedded in batches of 256 at torch's threads, the scores kept in
memory), on the same rows, in one run; each timed from loading the model to the last score, the median of
--repeats. Beside them clip-retrieval's published figure (`clip inference`: 1,500 samples/s on an RTX 3080, the
OpenAI ViT-B/32), set against each machine's limit: forward FLOPs a row (counted by torch for both models, ViT-B/32
built from transformers' default CLIPConfig) x rows/s, over the cores' measured fp32 matmul FLOP/s here and the
3080's data-sheet fp16 tensor peak there. Writes docs/benchmarks.md ("Batch inference").

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
from mfu import matmul_flops  # noqa: E402

CLIP_RETRIEVAL = 1500
"""clip-retrieval's README: `clip inference` computes image and text embeddings at 1,500 samples/s on an RTX 3080."""
RTX_3080_TFLOPS = 59.5
"""The RTX 3080's dense fp16 tensor peak with fp32 accumulation (NVIDIA's GA102 whitepaper)."""


def forward_flops(encode_image, encode_text, images, tokens) -> float:
    """FLOPs of one row (its image and its caption embedded), counted by torch over a batch of them; attention
    by SDPA's math kernel, which the counter sees."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        encode_image(images), encode_text(tokens)
    return counter.get_total_flops() / len(images)


def vit_b32_flops() -> float:
    """A row's forward FLOPs in the OpenAI ViT-B/32 CLIP (transformers' CLIPConfig defaults; 77 text tokens)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig()).eval()
    return forward_flops(lambda x: model.get_image_features(pixel_values=x),
                         lambda t: model.get_text_features(input_ids=t),
                         torch.zeros(2, 3, 224, 224), torch.zeros(2, 77, dtype=torch.long))


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
    import torch

    pixels = torch.from_numpy(preprocess.images(pq.read_table(str(version.shard_paths()[0]), columns=["image"])
                                                .column("image").to_pylist()[:2]))
    ours_flops = forward_flops(model.encode_image, model.encode_text, pixels,
                               torch.from_numpy(preprocess.tokens(["a red circle above a blue square"] * 2)))
    theirs_flops, peak = vit_b32_flops(), matmul_flops(torch.float32, torch.device("cpu"))
    command = (f"MMPIPE_HOME={os.environ.get('MMPIPE_HOME', '~/.mmpipe')} .venv/bin/python bench/infer_throughput.py "
               f"--dataset {args.dataset} --model {args.model} --repeats {args.repeats}")
    body = "\n".join([
        "## Batch inference: `mmpipe infer` against a plain loop", "",
        f"Command: `{command}` ({model_uri}, dataset {version.id}: {rows} rows; median of {args.repeats}).", "",
        "| | rows/s |", "|---|---|",
        f"| `mmpipe infer --output clip-score` (Ray Data actors, a derived version written) | {median(ours):.0f} |",
        f"| a plain loop in one process (torch's threads, batches of 256, nothing written) | {median(loop):.0f} |",
        f"| ratio | **{ratio:.2f}** |", "",
        "Against clip-retrieval's published figure (another model on another machine: set against each one's limit):",
        "", "| | model | GFLOP a row (forward) | rows/s | GFLOP/s | of the hardware's limit |",
        "|---|---|---|---|---|---|",
        f"| `mmpipe infer`, 2 CPU cores | {model_uri} | {ours_flops / 1e9:.3f} | {median(ours):.0f} | "
        f"{median(ours) * ours_flops / 1e9:.0f} | {median(ours) * ours_flops / peak:.0%} of {peak / 1e9:.0f} "
        "GFLOP/s (fp32 2048^2 matmul, measured) |",
        f"| clip-retrieval `clip inference`, RTX 3080 (published) | OpenAI ViT-B/32 | {theirs_flops / 1e9:.2f} | "
        f"{CLIP_RETRIEVAL} | {CLIP_RETRIEVAL * theirs_flops / 1e9:.0f} | "
        f"{CLIP_RETRIEVAL * theirs_flops / (RTX_3080_TFLOPS * 1e12):.0%} of {RTX_3080_TFLOPS} TFLOP/s (fp16 "
        "tensor, data sheet) |"])
    write_section("batch-inference", body)
    print(body)


if __name__ == "__main__":
    main()
