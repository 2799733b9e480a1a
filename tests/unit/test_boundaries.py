"""Architecture rules from DESIGN.md that a test can hold: import boundaries, no import side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_the_app_or_prefect():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"prefect", "pipelines"})
                 for p in (ROOT / "mmcore").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_stay_plain_modules():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"ray", "deepspeed", "mlflow", "prefect"})
                 for p in (ROOT / "mmcore" / "models").rglob("*.py")} if (ROOT / "mmcore" / "models").exists() else {}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_training_path_reads_no_question_the_sample_corpus_invents():
    """The corpus's questions reach training as its conversation file, as a user's do: no module a stage's
    stream is made in imports the corpus generator or its questions (evaluation may: it asks them)."""
    training = [ROOT / "mmcore" / "tasks.py", *(ROOT / "mmcore" / "train").rglob("*.py"),
                *[ROOT / "mmcore" / "data" / f"{name}.py" for name in ("instruct", "mixed", "passages", "units",
                                                                        "stream", "conversations")]]
    offenders = {}
    for path in training:
        modules = {node.module for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                    for alias in node.names}
        offenders[path.name] = sorted(m for m in modules if m.startswith("mmcore.data.synthetic"))
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_module_starts_with_a_docstring():
    for path in [p for top in ("mmcore", "pipelines", "tests", "bench") for p in (ROOT / top).rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"


def test_importing_the_library_has_no_side_effects(tmp_path):
    code = ("import os, mmcore.cli, mmcore.data.ingest, mmcore.data.synthetic.corpus; "
            "print(sorted(os.listdir('.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_the_trainer_and_the_model_bundle_need_neither_ray_nor_mlflow(tmp_path):
    """One-process training (mmcore.train.here), the checkpoint store and the model bundle load without Ray or
    MLflow: importing them imports neither (the Ray Train worker and the registry are the only adapters)."""
    code = ("import sys, mmcore.train.here, mmcore.train.trainer, mmcore.train.checkpoint, mmcore.bundle, "
            "mmcore.data.units; print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_tracking_registry_and_pyfunc_modules_import_mlflow():
    allowed = {"mmcore/tracking.py", "mmcore/registry.py", "mmcore/pyfunc.py", "mmcore/mlflow_model.py"}
    importers = {str(p.relative_to(ROOT)) for top in ("mmcore", "pipelines") for p in (ROOT / top).rglob("*.py")
                 if "mlflow" in _imports(p)}
    assert importers <= allowed, sorted(importers - allowed)
