"""Suites for contrastive (CLIP/SigLIP) models: zero-shot classification, retrieval, compositional probe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from mmcore.data.images import png_bytes
from mmcore.data.synthetic.corpus import DIGIT_WORDS, OPPOSITE, describe
from mmcore.eval.retrieval import embed, embed_images, embed_texts, retrieval_recall
from mmcore.eval.suites import SAMPLE_COLUMNS, SuiteError, SuiteResult, suite
from mmcore.models import capabilities

SPLIT = "test"
SHAPE_TEMPLATES = ("a {}", "a picture of a {}", "one {}")
DIGIT_TEMPLATES = ("a handwritten digit {word}", "a handwritten {digit}", "the number {word}")
# Worded unlike any caption of the sample corpus (a unit test checks their words occur in none): does
# the model know the colours, shapes and digits, or only the corpus's sentences?
HELDOUT_SHAPE_TEMPLATES = ("a drawing of a {}", "an illustration depicting a {}", "there is a {} in this picture")
HELDOUT_DIGIT_TEMPLATES = ("the numeral {word} sketched in pen", "somebody scribbled {word}", "{word}, inked")


def rows(version, columns: list[str], where: dict[str, object] | None = None) -> pa.Table:
    """The test split's rows with `columns`, filtered by column == value (None: is null)."""
    missing = [c for c in columns if c not in version.manifest["source"].get("extras", []) + [
        "key", "url", "caption", "image", "width", "height", "sha256", "split"]]
    if missing:
        raise SuiteError(f"dataset {version.id} has no column(s) {missing}; this suite needs the sample corpus's "
                         "attribute columns")
    if not version.shard_paths(SPLIT):
        raise SuiteError(f"dataset {version.id} has no {SPLIT!r} split")
    table = version.read(SPLIT, columns=list(dict.fromkeys(columns + ["key", "split"])))
    for column, value in (where or {}).items():
        mask = pc.is_null(table.column(column)) if value is None else pc.equal(table.column(column), value)
        table = table.filter(mask)
    return table


def class_embeddings(model, preprocess, prompts: list[list[str]]) -> np.ndarray:
    """Prompt ensembling (Radford et al. 2021): the mean of each class's template embeddings, renormalised."""
    means = np.stack([embed_texts(model, preprocess, texts).mean(0) for texts in prompts])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def confusion_png(matrix: np.ndarray, labels: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1 + 0.45 * len(labels), 1 + 0.45 * len(labels)))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=90)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            axis.text(j, i, str(value), ha="center", va="center", fontsize=7)
    return _png(figure)


def zero_shot(model, preprocess, table: pa.Table, classes: list[str], prompts: list[list[str]],
              title: str) -> SuiteResult:
    """Accuracy of picking the class whose prompts match the image best; confusion matrix."""
    if table.num_rows == 0:
        raise SuiteError(f"{title}: no labelled rows in the {SPLIT} split")
    image_emb = embed_images(model, preprocess, table.column("image").to_pylist())
    predicted = (image_emb @ class_embeddings(model, preprocess, prompts).T).argmax(1)
    truth = np.array([classes.index(label) for label in table.column("label").to_pylist()])
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    per_class = pd.DataFrame({"class": classes, "n": matrix.sum(1),
                              "accuracy": np.diag(matrix) / np.maximum(matrix.sum(1), 1)})
    metrics = {"accuracy": float((predicted == truth).mean()), "chance": 1 / len(classes), "n": float(len(truth))}
    return SuiteResult(metrics, "accuracy", tables={"per_class": per_class},
                       figures={"confusion_matrix.png": confusion_png(matrix, classes, title)})


def _shapes(model, preprocess, version, templates: tuple[str, ...], title: str) -> SuiteResult:
    table = rows(version, ["image", "label", "source", "relation"], {"source": "synthetic", "relation": None})
    classes = sorted(set(table.column("label").to_pylist()))
    return zero_shot(model, preprocess, table, classes, [[t.format(c) for t in templates] for c in classes], title)


def _digits(model, preprocess, version, templates: tuple[str, ...], title: str) -> SuiteResult:
    table = rows(version, ["image", "label", "source"], {"source": "sklearn-digits"})
    classes = [str(d) for d in range(10)]
    prompts = [[t.format(word=DIGIT_WORDS[d], digit=d) for t in templates] for d in range(10)]
    return zero_shot(model, preprocess, table, classes, prompts, title)


@suite("zeroshot-shapes", {"embed"}, "zero-shot colour+shape classification of single-group synthetic scenes",
       SAMPLE_COLUMNS)
def zeroshot_shapes(model, preprocess, version) -> SuiteResult:
    return _shapes(model, preprocess, version, SHAPE_TEMPLATES, "zero-shot colour + shape")


@suite("zeroshot-shapes-heldout", {"embed"}, "zeroshot-shapes with prompts worded unlike any corpus caption",
       SAMPLE_COLUMNS)
def zeroshot_shapes_heldout(model, preprocess, version) -> SuiteResult:
    return _shapes(model, preprocess, version, HELDOUT_SHAPE_TEMPLATES, "zero-shot colour + shape, held-out prompts")


@suite("zeroshot-digits", {"embed"}, "zero-shot classification of held-out scikit-learn digits (0-9)",
       SAMPLE_COLUMNS)
def zeroshot_digits(model, preprocess, version) -> SuiteResult:
    return _digits(model, preprocess, version, DIGIT_TEMPLATES, "zero-shot digits")


@suite("zeroshot-digits-heldout", {"embed"}, "zeroshot-digits with prompts worded unlike any corpus caption",
       SAMPLE_COLUMNS)
def zeroshot_digits_heldout(model, preprocess, version) -> SuiteResult:
    return _digits(model, preprocess, version, HELDOUT_DIGIT_TEMPLATES, "zero-shot digits, held-out prompts")


@suite("zeroshot", {"embed"}, "zero-shot classification into the classes of a file the user gives (class names "
       "and prompt templates, as CLIP_benchmark's), on its label column", kinds=("captions", "instructions"),
       options=("classes",))
def zeroshot(model, preprocess, version, classes: str) -> SuiteResult:
    """`classes`: a JSON file {"column": the label column, "classes": [names], "templates": ["a photo of a {}.",
    ...]}; the test split's rows whose label is one of the classes are classified (the others counted)."""
    column, names, templates = _classes_file(classes)
    table = rows(version, ["image", column])
    labels = table.column(column).cast(pa.string())
    keep = pc.fill_null(pc.is_in(labels, pa.array(names)), False)
    labelled = pa.table({"image": table.column("image").filter(keep), "label": labels.filter(keep)})
    result = zero_shot(model, preprocess, labelled, names, [[t.format(c) for t in templates] for c in names],
                       f"zero-shot {Path(classes).name}")
    result.metrics["unlabelled"] = float(table.num_rows - labelled.num_rows)
    return result


def _classes_file(path: str) -> tuple[str, list[str], list[str]]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SuiteError(f"zeroshot: cannot read the classes file {path} ({err})") from None
    checks = [("column", isinstance(spec.get("column"), str)),
              ("classes", isinstance(spec.get("classes"), list) and len(spec["classes"]) >= 2
               and all(isinstance(c, str) for c in spec["classes"])),
              ("templates", isinstance(spec.get("templates"), list) and bool(spec["templates"])
               and all(isinstance(t, str) and "{}" in t for t in spec["templates"]))]
    wrong = [name for name, ok in checks if not ok]
    if wrong:
        raise SuiteError(f"zeroshot: {path}: {', '.join(wrong)} missing or malformed; expected "
                         '{"column": "label", "classes": ["cat", "dog", ...], "templates": ["a photo of a {}.", ...]}')
    return spec["column"], spec["classes"], spec["templates"]


def retrieval_grid(table: pa.Table, similarity: np.ndarray, captions: list[str], count: int = 6) -> bytes:
    """Query images beside their top-3 retrieved captions (green: right, red: wrong)."""
    size, width = 64, 420
    canvas = Image.new("RGB", (width, count * (size + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    images = table.column("image").to_pylist()
    for row in range(min(count, len(images))):
        y = row * (size + 8)
        with Image.open(io.BytesIO(images[row])) as image:
            canvas.paste(image.convert("RGB").resize((size, size)), (0, y))
        for rank, j in enumerate(np.argsort(-similarity[row])[:3]):
            right = captions[j] == captions[row]
            draw.text((size + 8, y + 4 + rank * 18), f"{rank + 1}. {captions[j][:58]}",
                      fill=(0, 130, 0) if right else (190, 0, 0))
    return png_bytes(canvas)


@suite("retrieval", {"embed"}, "image-to-text and text-to-image recall@1/5/10 on the test split")
def retrieval(model, preprocess, version) -> SuiteResult:
    table = rows(version, ["image", "caption"])
    if table.num_rows < 10:
        raise SuiteError(f"retrieval: the {SPLIT} split has {table.num_rows} rows; at least 10 are needed")
    image_emb, text_emb = embed(model, preprocess, table)
    captions = table.column("caption").to_pylist()
    metrics = retrieval_recall(image_emb, text_emb, captions)
    summary = pd.DataFrame([{"direction": d, **{f"R@{k}": metrics[f"{d}_recall_{k}"] for k in (1, 5, 10)}}
                            for d in ("image_to_text", "text_to_image")])
    grid = retrieval_grid(table, image_emb @ text_emb.T, captions)
    return SuiteResult(metrics, "image_to_text_recall_5", tables={"recall": summary}, figures={"examples.png": grid})


def foils(row: dict) -> dict[str, str]:
    """Wrong captions with the same words: colours swapped between the groups; relation reversed.
    The caption's framing ("an image of ...") is kept, so only the scene's words differ."""
    swapped = dict(row, color=row["color2"], color2=row["color"])
    reversed_ = dict(row, relation=OPPOSITE[row["relation"]])
    scene = describe(row)
    if scene not in row["caption"]:
        raise SuiteError(f"compositional: caption {row['caption']!r} does not contain its scene {scene!r}")
    return {"swap_attributes": row["caption"].replace(scene, describe(swapped)),
            "swap_relation": row["caption"].replace(scene, describe(reversed_))}


def _agreement(model, preprocess, images: list[bytes]):
    """texts -> how well each text fits its image: cosine similarity for a model that embeds, the
    caption's log-likelihood given the image for one that scores (fusion, unified)."""
    if "embed" in capabilities(model):
        image_emb = embed_images(model, preprocess, images)
        return lambda texts: (image_emb * embed_texts(model, preprocess, texts)).sum(1)
    from mmcore.data.instruct import CAPTION_PROMPT
    from mmcore.models.encode import score_answers

    return lambda texts: score_answers(model, preprocess, images, [CAPTION_PROMPT] * len(texts), texts)


@suite("compositional", {"embed", "score"}, "true caption vs the same words with attributes or relation swapped",
       SAMPLE_COLUMNS)
def compositional(model, preprocess, version) -> SuiteResult:
    columns = ["image", "caption", "source", "relation", "count", "color", "shape", "count2", "color2", "shape2"]
    table = rows(version, columns, {"source": "synthetic"})
    table = table.filter(pc.invert(pc.is_null(table.column("relation"))))
    if table.num_rows == 0:
        raise SuiteError("compositional: no two-group synthetic scenes in the test split")
    records = table.to_pylist()
    agreement = _agreement(model, preprocess, table.column("image").to_pylist())
    true_score = agreement([r["caption"] for r in records])
    metrics, examples = {}, []
    for kind in ("swap_attributes", "swap_relation"):
        texts = [foils(r)[kind] for r in records]
        wins = true_score > agreement(texts)
        metrics[f"{kind}_accuracy"] = float(wins.mean())
        examples += [{"kind": kind, "true": r["caption"], "foil": t, "preferred_true": bool(w)}
                     for r, t, w in list(zip(records, texts, wins))[:20]]
    metrics["accuracy"] = (metrics["swap_attributes_accuracy"] + metrics["swap_relation_accuracy"]) / 2
    metrics.update(chance=0.5, n=float(len(records)))
    return SuiteResult(metrics, "accuracy", tables={"examples": pd.DataFrame(examples)})
