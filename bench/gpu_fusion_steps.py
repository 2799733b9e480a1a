"""The fusion stage's demo LLaVA trained for many more steps than 2 CPU cores allow, on a GPU: does binding come?

On 2 cores `demo-fusion` trains 400 steps and `quality-fusion` 2,000; the questions that need binding
(two groups' colours, the relation, yes/no against a foil) stay near guessing at both. This bench trains
the same model on the same data with the same recipe (lr, warmup, cosine, packing, batch 64), only for
more steps, on a CUDA GPU through the workers' engine (DeepSpeed ZeRO-2, bf16 as `precision: auto` picks,
NCCL), and runs the vqa suite on the test split at each listed step. It needs no registry there:
  here:   python bench/gpu_fusion_steps.py --export DIR --parent models:/mmpipe-contrastive/1
          (writes the parent contrastive model's files to DIR)
  there:  python bench/gpu_fusion_steps.py --parent-files DIR --dataset D --steps 2000 8000 16000
Batches: the train split epoch after epoch, rows shuffled per epoch and each row's questions drawn for
its epoch by the stage's own preprocessing (as the training stream does), made by a process pool. The
evaluations before the last step are mid-schedule (the lr has not decayed yet). --budget-s stops early,
after the last evaluation that fits, and the table says which steps were reached.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import nccl_world_of_one, pinned_model, write_section  # noqa: E402

SHOWN = ["accuracy", "colour_one_group_accuracy", "colour_two_groups_accuracy", "shape_accuracy", "count_accuracy",
         "relation_accuracy", "yes_no_accuracy", "digit_accuracy", "heldout_accuracy"]


def export(parent: str, out: Path) -> None:
    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig

    files = registry.model_files(parent, tracking.resolve_uri(TrackingConfig()))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("weights", "config", "tokenizer", "preprocess"):
        shutil.copy(getattr(files, name), out)
    (out / "parent.txt").write_text(pinned_model(parent))
    print(f"{parent}'s files in {out}")


def _preprocess(args):
    pre, rows = args
    return pre(rows)


def epochs(pre, dataset: str, batch: int, workers: int):
    """Preprocessed batches (numpy), epoch after epoch of the train split, rows shuffled per epoch."""
    import multiprocessing

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(dataset, "shards").glob("train-*.parquet")))
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in pre.columns if c in table.column_names}

    def chunks():
        epoch = 0
        while True:
            order = np.random.default_rng(epoch).permutation(len(table))
            for start in range(0, len(order) - batch + 1, batch):
                take = order[start:start + batch]
                yield pre, {**{c: v[take] for c, v in columns.items()}, "epoch": np.full(batch, epoch, np.int64)}
            epoch += 1

    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # a few batches ahead, not the whole stream
        source = chunks()
        pending = collections.deque(pool.apply_async(_preprocess, (next(source),)) for _ in range(4 * workers))
        while True:
            done = pending.popleft().get()
            pending.append(pool.apply_async(_preprocess, (next(source),)))
            yield done


def run(parent_files: Path, dataset: str, steps: list[int], budget_s: float, workers: int) -> tuple[list[dict], dict]:
    import torch
    from safetensors.torch import load_file

    from mmcore.data.dataset import DatasetVersion
    from mmcore.eval.generative import vqa
    from mmcore.models import model_config
    from mmcore.recipes import recipe
    from mmcore.stages import STAGES
    from mmcore.tasks import build_task
    from mmcore.train.deepspeed_config import cast_floating, initialize

    cfg = recipe("demo-fusion", dataset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, parent=""),
                              optim=dataclasses.replace(cfg.optim, max_steps=max(steps)),
                              parallel=dataclasses.replace(cfg.parallel, num_workers=1, precision="auto"))
    part = STAGES["fusion"].parent.takes
    arch = {**model_config(cfg.model.name), **part(json.loads((parent_files / "model.json").read_text()))}
    version = DatasetVersion.open(dataset)
    tokenizer_json = STAGES["fusion"].task.tokenizer(version.tokenizer_path.read_text())
    task, preprocess = build_task(cfg, arch, tokenizer_json)
    tower = {k.removeprefix("visual."): v for k, v in load_file(parent_files / "weights.safetensors").items()
             if k.startswith("visual.")}
    task.model.visual.load_state_dict(tower)  # frozen by build_task (model.freeze_vision)
    pre = STAGES["fusion"].task.preprocessor(cfg, preprocess, tokenizer_json)
    engine, precision, dtype = initialize(task, cfg, cuda=True)
    batches = epochs(pre, dataset, cfg.data.batch_size, workers)
    results, started, losses, evaluating = [], time.perf_counter(), [], 0.0
    for step in range(1, max(steps) + 1):
        batch = cast_floating({k: torch.as_tensor(v).cuda() for k, v in next(batches).items()}, dtype)
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].detach())
        if step in steps:
            trained = time.perf_counter() - started - evaluating
            model = copy.deepcopy(engine.module.model).float().cpu().eval()
            before = time.perf_counter()
            metrics = vqa(model, pre, version).metrics
            evaluating += time.perf_counter() - before
            loss = float(torch.stack(losses[-50:]).mean())
            results.append({"step": step, "train_s": trained, "loss": loss, **metrics})
            print(json.dumps(results[-1]), flush=True)
            remaining = [s for s in steps if s > step]
            elapsed = time.perf_counter() - started
            if remaining and elapsed * remaining[0] / step > budget_s:
                print(f"stopping at step {step}: step {remaining[0]} would not fit in {budget_s:.0f} s", flush=True)
                break
    return results, {"precision": precision, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "parent": (parent_files / "parent.txt").read_text().strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="write the parent's files here (on the machine with the registry)")
    parser.add_argument("--parent", default="models:/mmpipe-contrastive@champion", help="with --export")
    parser.add_argument("--parent-files", type=Path, help="a directory --export wrote")
    parser.add_argument("--dataset", help="the dataset version the parent was trained on")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 8000, 16000], help="evaluate at these steps")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop after the last evaluation that fits")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="preprocessing processes")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    if args.export:
        return export(args.parent, args.export)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_fusion_steps.py trains on a CUDA GPU; none found here (--export runs anywhere)")
    if not (args.parent_files and args.dataset):
        parser.error("--parent-files and --dataset are needed to train")
    nccl_world_of_one(29512)
    torch.manual_seed(0)
    results, about = run(args.parent_files, args.dataset, sorted(args.steps), args.budget_s, args.workers)
    command = (f".venv/bin/python bench/gpu_fusion_steps.py --parent-files DIR --dataset DIR --steps "
               f"{' '.join(map(str, sorted(args.steps)))}"
               + (f" --budget-s {args.budget_s:.0f}" if args.budget_s < 1e9 else ""))
    shown = ["train s", "train loss (last 50)"] + [m.removesuffix("_accuracy") for m in SHOWN]
    lines = [f"## Fusion on a GPU: the demo LLaVA, cosine to step {max(args.steps)}", "", f"Command: `{command}`", "",
             f"1 x {about['gpu']}, torch {about['torch']}, {about['precision']}, DeepSpeed ZeRO-2 in one process; "
             f"`demo-fusion` (batch 64, packed questions, lr 1e-3, cosine to step {max(args.steps)}) on the frozen "
             f"tower of {about['parent']}; vqa on the test split at each step (before the last: mid-schedule). "
             "Chance: colour 1/6, shape 1/3, count 1/3, relation 1/4, yes/no 1/2, digit 1/10.", "",
             "| step | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['step']} | {r['train_s']:.0f} | {r['loss']:.3f} | "
                     + " | ".join(f"{r.get(m, float('nan')):.3f}" for m in SHOWN) + " |")
    body = "\n".join(lines)
    print(body)
    write_section(f"gpu-fusion-steps-{max(args.steps)}", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
