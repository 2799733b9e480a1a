"""No training loop outside mmcore/train (issue 37): stages, benchmarks and experiments all train through the
one trainer. A `.backward(` call is how a loop of one's own shows; the few files that hold one on purpose
are listed with their reason, and each must still hold one (so the list cannot rot)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "mmcore" / "train"
ALLOWED = {
    "bench/train_contrastive.py": "plain_pytorch: the loop a user would write instead, which fit() is measured against",
    "bench/openclip_side.py": "open_clip's own training, the other side of bench/vs_openclip.py",
    "bench/common.py": "flops_per_sample: one forward and backward under torch's FLOP counter, no optimizer",
}
"""Repository path -> why its backward call is not a training loop of ours."""
SKIPPED = {"build", "dist", "node_modules", "__pycache__"}
"""Folders never searched, beside hidden ones (.git, .venv*) and *.egg-info."""


def python_files() -> list[Path]:
    """Every .py file of the repository outside mmcore/train."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED and not d.endswith(".egg-info")
                   and Path(folder, d) != TRAINER]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return found


def backward_calls(path: Path) -> list[int]:
    """Lines of the `something.backward(...)` calls in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return sorted(node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Attribute) and node.func.attr == "backward")


def test_the_check_sees_the_trainers_step():
    assert backward_calls(TRAINER / "trainer.py"), "mmcore/train/trainer.py has no .backward( call: fix this test"
    files = python_files()
    assert ROOT / "bench" / "gpu_engine.py" in files
    assert not [path for path in files if TRAINER in path.parents]


def test_no_training_loop_outside_the_trainer():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in python_files() for line in backward_calls(path)
             if path.relative_to(ROOT).as_posix() not in ALLOWED]
    assert not found, (
        f"a training step outside mmcore/train at {', '.join(found)}: train through the one trainer instead, "
        "`python -m mmcore.train --recipe R --dataset D [--set FIELD=VALUE]` (one process, no Ray or registry; "
        "train_here in code), start_engine + mmcore.train.trainer.Trainer.fit (batches of your own), or fit() / "
        "`mmpipe train` (registered in MLflow). A baseline that is another tool's loop by design goes in ALLOWED "
        "in this test, with its reason.")


@pytest.mark.parametrize("path", sorted(ALLOWED))
def test_each_allowed_file_still_has_its_backward(path):
    assert backward_calls(ROOT / path), f"{path} has no .backward( call any more: remove it from ALLOWED"
