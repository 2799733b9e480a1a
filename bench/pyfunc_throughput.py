"""Registry model throughput: the MLflow pyfunc loaded by alias against the same module in-process.

The demo architecture (`clip-demo`) is logged and registered exactly as `fit()` does it (weights
freshly initialised: throughput does not depend on training), then 512 sample images and 512
captions are embedded three ways, three repetitions each:
1. in-process: `embed_images` + `embed_texts` on the native module (the evaluation path);
2. the pyfunc from `models:/bench-pyfunc@candidate`, one DataFrame of all 1,024 rows;
3. the pyfunc fed one row per call, as the registry model answered before it batched.
Usage: python bench/pyfunc_throughput.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_section  # noqa: E402

ROWS = 512
REPS = 3


def sample_rows(root: Path) -> tuple[list[bytes], list[str]]:
    """Images and captions of the sample corpus (synthetic scenes and digits), read from disk."""
    import pyarrow.parquet as pq

    from mmcore.data.synthetic.corpus import SampleSpec, make_sample

    base = "http://127.0.0.1:1"
    url_list = make_sample(root, base, SampleSpec(synthetic=ROWS // 2, digits=ROWS // 2, photos=False,
                                                  defects=False))
    table = pq.read_table(url_list, columns=["url", "caption"]).slice(0, ROWS)
    images = [(root / url.removeprefix(base + "/")).read_bytes() for url in table.column("url").to_pylist()]
    return images, table.column("caption").to_pylist()


def register(root: Path, captions: list[str]) -> str:
    """A clip-demo bundle logged and registered as fit() does; returns its tracking URI."""
    from mlflow.tracking import MlflowClient

    from mmcore import registry, tracking
    from mmcore.bundle import ModelBundle
    from mmcore.data.config import TokenizerConfig
    from mmcore.data.tokenizer import EOS, train_tokenizer
    from mmcore.models import build_model, model_config

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tokenizer = train_tokenizer(captions, TokenizerConfig())
    tokenizer.save(str(root / "tokenizer.json"))
    config = model_config("clip-demo")
    model, pre = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
    ModelBundle.write(root / "bundle", model, config, (root / "tokenizer.json").read_text(), pre)
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(root / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    registry.log_and_register(uri, run_id, root / "bundle", "bench-pyfunc", "candidate", {})
    return uri


def timed(fn) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(REPS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    import mlflow
    import numpy as np
    import pandas as pd

    from mmcore.models.encode import embed_images, embed_texts
    from mmcore.registry import load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MMPIPE_HOME"] = str(root / "home")
        images, captions = sample_rows(root / "corpus")
        mlflow.set_tracking_uri(register(root, captions))
        model, pre = load_model("models:/bench-pyfunc@candidate")
        pyfunc = mlflow.pyfunc.load_model("models:/bench-pyfunc@candidate")
        frame = pd.concat([pd.DataFrame({"image": images}), pd.DataFrame({"text": captions})], ignore_index=True)
        native = np.concatenate([embed_images(model, pre, images), embed_texts(model, pre, captions)])
        assert np.allclose(np.asarray(pyfunc.predict(frame)), native, atol=1e-5), "the pyfunc embeds as the module"
        results = {
            "in-process module (embed_images + embed_texts)": timed(
                lambda: (embed_images(model, pre, images), embed_texts(model, pre, captions))),
            "pyfunc by alias, one DataFrame": timed(lambda: pyfunc.predict(frame)),
            "pyfunc by alias, one row per call": timed(
                lambda: [pyfunc.predict(frame.iloc[[i]]) for i in range(len(frame))]),
        }
    body = report(results, len(frame))
    print(body)
    write_section("pyfunc-throughput", body)


def report(results: dict[str, list[float]], rows: int) -> str:
    base = median(next(iter(results.values())))
    lines = [
        "## Registry model throughput (pyfunc vs in-process)",
        "",
        "Command: `.venv/bin/python bench/pyfunc_throughput.py`",
        "",
        f"`clip-demo` logged and registered as `fit()` does; {rows // 2} sample images and {rows // 2} captions "
        f"({rows} rows), {REPS} repetitions after a warm-up; rows/s from the median.",
        "",
        "| variant | seconds per rep | median s | rows/s | ratio to in-process |",
        "|---|---|---|---|---|",
    ]
    for name, times in results.items():
        lines.append(f"| {name} | {', '.join(f'{t:.2f}' for t in times)} | {median(times):.2f} | "
                     f"{rows / median(times):.0f} | {base / median(times):.2f} |")
    lines += ["", "Target for the batched pyfunc: ratio >= 0.8."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
