"""Helpers shared by the benchmarks (and the experiments, which put bench/ on sys.path): machine description,
writing a section of docs/benchmarks.md, the lr schedule."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every figure here was written by the command shown above it, on the machine it names.
Re-run a command to refresh its section; the other sections are left as they are.
Investigations (why the fusion stage does not bind, Flamingo's gates, the two fusion families, where the
unified stage's image codes are made) are in experiments/, each with its question, commands and answer.
"""


PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}
"""Dense bf16 tensor-core peak per GPU (vendor data sheets, without sparsity), by name fragment."""


def peak_tflops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_sample(task, batch: dict) -> float:
    """FLOPs of one training sample of a Task (forward + backward), counted by torch's FlopCounterMode
    over `batch` (2 samples, on the Task's device); the gradients it leaves are cleared."""
    return sum(flops_by_op(task, batch).values())


def flops_by_op(task, batch: dict, math_attention: bool = True) -> dict[str, float]:
    """flops_per_sample by aten op ("aten::mm", ...). Attention runs SDPA's math kernel (its matmuls counted as
    aten::bmm): FlopCounterMode has no entry for the CPU's fused kernel and would leave attention out (7-18% of
    the demo models' FLOPs); `math_attention=False` counts under the kernels training runs, attention's left out
    on a CPU."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, math:
        task(batch)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return {f"aten::{str(op).split('.')[-1]}": count / 2 for op, count in counter.get_flop_counts()["Global"].items()}


def nccl_world_of_one(port: int) -> None:
    """A process group of one rank on NCCL, as a training worker has on one GPU (the GPU benches run
    the workers' engine without Ray)."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def median(values) -> float:
    return statistics.median(values)


def measured() -> str:
    """The line under a table that says when and where it was measured."""
    return f"_Measured {time.strftime('%Y-%m-%d')} on {machine()}._"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section delimited by <!-- name:start --> / <!-- name:end -->."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamped = f"{start}\n{body.strip()}\n\n{measured()}\n{end}"
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: stamped, text) if pattern.search(text) else text.rstrip() + "\n\n" + stamped + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def pinned_model(uri: str) -> str:
    """models:/NAME@ALIAS (or /VERSION) -> models:/NAME/VERSION in the registry of $MMPIPE_HOME, so a
    section's command names the version it measured."""
    from mmcore.config import TrackingConfig
    from mmcore.tracking import resolve_uri
    from mmcore.registry import resolve_version

    return "models:/{}/{}".format(*resolve_version(uri, resolve_uri(TrackingConfig())))


def warmup_cosine(params: dict) -> Callable[[int], float]:
    """The lr factor of optimizer step k (from 0) under DeepSpeed's WarmupCosineLR with these params.

    DeepSpeed sets the factor of iteration -1 (zero) when it builds the scheduler and advances one iteration
    after each optimizer step, so step k runs at the factor of iteration k - 1. Warm-up is logarithmic
    unless warmup_type says linear (DeepSpeed's default is "log"; our config sets "linear").
    """
    warmup, total = max(2, params["warmup_num_steps"]), params["total_num_steps"]
    low, floor, kind = params["warmup_min_ratio"], params["cos_min_ratio"], params.get("warmup_type", "log")
    if kind not in ("log", "linear"):
        raise ValueError(f"scheduler warmup_type {kind!r}: only log and linear are reproduced")

    def factor(step: int) -> float:
        iteration = step - 1
        if iteration < 0:
            return 0.0
        if iteration < warmup:
            ramp = math.log(iteration + 1) / math.log(warmup) if kind == "log" else iteration / warmup
            return low + ramp * (1 - low)
        progress = min(1.0, (iteration - warmup + 1) / max(1, total - warmup))
        return max(0.0, floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    return factor
