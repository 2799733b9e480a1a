"""The suite for models that draw: images generated from the test split's scene captions, judged
twice: by a pixel check that needs no model (the dominant saturated colour is the caption's) and by
the contrastive champion (zero-shot colour + shape of the drawing is the caption's)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mmcore import registry, tracking
from mmcore.config import TrackingConfig
from mmcore.data.images import png_bytes
from mmcore.data.synthetic.corpus import COLORS, SHAPES
from mmcore.eval.contrastive import SHAPE_TEMPLATES, class_embeddings, rows
from mmcore.eval.retrieval import embed_images
from mmcore.eval.suites import SAMPLE_COLUMNS, SuiteError, SuiteResult, suite
from mmcore.models.encode import draw_images

JUDGE = "models:/mmpipe-contrastive@champion"
PROMPTS = 120
"""Single-group scenes of the test split drawn (their captions are the prompts), in key order."""
SETTINGS = {"temperature": 1.0, "top_k": 0, "guidance": 3.0}
"""How the suite samples: a fixed seed, so a model's figure is reproducible."""
PALETTE = np.array(list(COLORS.values()), np.float64)
MIN_SATURATION, MAX_DISTANCE, MIN_SHARE = 90, 80.0, 0.01
"""A pixel counts for a colour when it is saturated (max - min channel) and near that palette
colour; the light, unsaturated backgrounds never count. Under MIN_SHARE of the image: no colour."""


def dominant_colour(image: np.ndarray) -> str:
    """(S, S, 3) uint8 -> the sample corpus colour most of its saturated pixels are nearest, or "none"."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    saturated = pixels.max(1) - pixels.min(1) >= MIN_SATURATION
    distance = np.linalg.norm(pixels[:, None, :] - PALETTE[None], axis=2)
    nearest = distance.argmin(1)
    counted = saturated & (distance.min(1) <= MAX_DISTANCE)
    if counted.sum() < MIN_SHARE * len(pixels):
        return "none"
    return list(COLORS)[int(np.bincount(nearest[counted], minlength=len(COLORS)).argmax())]


def _judge(image_sets: list[list[bytes]], truth: list[str]) -> list[np.ndarray] | None:
    """For each set of images, whether the contrastive champion's zero-shot colour + shape of each
    image is its truth; None when no contrastive champion is registered."""
    try:
        judge, judge_pre = registry.load_model(JUDGE, tracking.resolve_uri(TrackingConfig()))
    except tracking.TrackingError:
        return None
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    text = class_embeddings(judge, judge_pre, [[t.format(c) for t in SHAPE_TEMPLATES] for c in classes])
    right = []
    for images in image_sets:
        predicted = (embed_images(judge, judge_pre, images) @ text.T).argmax(1)
        right.append(np.array([classes[p] == t for p, t in zip(predicted, truth)]))
    return right


def _grid(prompts: list[str], images: np.ndarray, count: int = 12) -> bytes:
    side, label = images.shape[1] * 2, 56
    canvas = Image.new("RGB", (min(count, len(images)) * side, side + label), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (prompt, image) in enumerate(zip(prompts[:count], images[:count])):
        canvas.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (i * side, 0))
        words = prompt.split()
        for line in range(4):
            draw.text((i * side + 2, side + 2 + 13 * line), " ".join(words[3 * line: 3 * line + 3]), fill="black")
    return png_bytes(canvas)


@suite("text-to-image", {"generate_image"}, "scenes drawn from test captions: pixel colour check and a "
       "contrastive judge of colour + shape", SAMPLE_COLUMNS)
def text_to_image(model, preprocess, version) -> SuiteResult:
    table = rows(version, ["image", "caption", "color", "shape", "source", "relation"],
                 {"source": "synthetic", "relation": None})
    records = table.to_pylist()[:PROMPTS]
    if not records:
        raise SuiteError(f"text-to-image: dataset {version.id}'s test split has no single-group synthetic scenes")
    prompts = [r["caption"] for r in records]
    drawn = draw_images(model, preprocess, prompts, **SETTINGS)
    colours = [dominant_colour(image) for image in drawn]
    real = preprocess.batch_pixels([r["image"] for r in records]).transpose(0, 2, 3, 1)
    real_colours = [dominant_colour(image) for image in real]
    truth_colour = [r["color"] for r in records]
    metrics = {"pixel_colour_accuracy": float(np.mean([c == t for c, t in zip(colours, truth_colour)])),
               "pixel_colour_accuracy_real": float(np.mean([c == t for c, t in zip(real_colours, truth_colour)])),
               "no_colour_fraction": float(np.mean([c == "none" for c in colours])), "n": float(len(records))}
    truth = [f"{r['color']} {r['shape']}" for r in records]
    judged = _judge([[png_bytes(Image.fromarray(image)) for image in drawn], [r["image"] for r in records]], truth)
    if judged is not None:
        metrics["judge_colour_shape_accuracy"] = float(judged[0].mean())
        metrics["judge_colour_shape_accuracy_real"] = float(judged[1].mean())
    examples = pd.DataFrame({"prompt": prompts, "pixel_colour": colours, "colour": truth_colour,
                             **({"judge_right": judged[0]} if judged is not None else {})})
    return SuiteResult(metrics, "pixel_colour_accuracy", tables={"examples": examples},
                       figures={"drawn.png": _grid(prompts, drawn)})
