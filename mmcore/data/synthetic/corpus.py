"""The sample corpus mmpipe makes itself: synthetic shape scenes, real packaged images, planted defects.

Written as image files plus `urls.parquet` (url, caption and attribute columns) so that
ingest downloads them for real from `mmpipe sample serve`. Deterministic for a given seed.

Three kinds of rows (column `source`):
  synthetic        shapes, colours, counts and relations; the caption describes the scene
                   exactly (caption_kind "generated"); attributes kept as columns.
  sklearn-digits   scikit-learn's 1,797 real handwritten 8x8 digits; templated captions.
  photo / lfw      scikit-image's and scikit-learn's bundled photos with captions we wrote,
                   and scikit-image's LFW subset (faces vs non-faces), templated.
Defects (column `defect` = the rejection reason ingest must give) are planted on purpose:
404s, HTML as .jpg, truncated JPEGs, a decompression-bomb header, blocked hosts, bad schemes,
duplicates, foreign-language and empty captions.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from mmcore.data.images import png_bytes

COLORS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a scan of a handwritten {digit}",
    "a small image of the digit {word}",
    "{word} on a scanned form",
)  # at most five: exact-caption retrieval cannot tell which wording an image was given
# How a scene is framed in its caption, as alt text frames it: the model must learn that the scene's
# words carry the meaning, not the framing (no more than five, so exact-caption retrieval stays fair).
SCENE_TEMPLATES = (
    "{}",
    "an image of {}",
    "{} on a light background",
    "a simple graphic with {}",
    "clip art of {}",
)
PHOTO_CAPTIONS = {  # scikit-image / scikit-learn bundled photos, captions written for mmpipe
    "astronaut": "an astronaut in a white spacesuit in front of a flag",
    "brick": "a grayscale photo of a brick wall",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "cell": "a grayscale microscope image of a cell",
    "chelsea": "a tabby cat looking to the side",
    "clock": "a black and white photo of a wall clock",
    "coffee": "a cup of coffee on a saucer seen from above",
    "coins": "old coins laid out in rows",
    "colorwheel": "a colour wheel showing every hue",
    "grass": "a grayscale close up of grass",
    "gravel": "a grayscale close up of gravel",
    "horse": "a black silhouette of a horse on a white background",
    "hubble_deep_field": "many distant galaxies in a deep field telescope image",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "moon": "the cratered surface of the moon",
    "page": "a scanned page of printed text",
    "retina": "a photo of the retina at the back of an eye",
    "rocket": "a rocket standing on its launch pad",
    "china.jpg": "a temple roof among trees",
    "flower.jpg": "a close up of a pink flower",
}
TRANSLATED = [  # captions in other languages: the language filter must reject them
    "deux cercles rouges à gauche d'un carré bleu",
    "zwei gelbe Dreiecke über einem grünen Quadrat",
    "un cuadrado azul debajo de un círculo naranja",
    "un triangolo viola a destra di un cerchio verde",
    "een rode cirkel links van een blauw vierkant",
    "красный круг слева от синего квадрата",
]
_CAPTION = "a red circle left of a blue square"
COLUMNS = ["url", "caption", "source", "caption_kind", "label", "shape", "color", "count",
           "relation", "shape2", "color2", "count2", "defect"]
SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("source", pa.string()),
    ("caption_kind", pa.string()), ("label", pa.string()), ("shape", pa.string()),
    ("color", pa.string()), ("count", pa.int32()), ("relation", pa.string()),
    ("shape2", pa.string()), ("color2", pa.string()), ("count2", pa.int32()), ("defect", pa.string()),
])


@dataclass
class SampleSpec:
    """What the sample corpus holds."""

    synthetic: int = 8000
    """Synthetic shape scenes (with fewer, a model that trains for minutes memorises them instead of
    learning the shapes)."""
    digits: int = 1797
    """scikit-learn digits (at most 1,797)."""
    photos: bool = True
    """Include the bundled photos and the LFW subset."""
    defects: bool = True
    """Plant the defect rows (each names the reason ingest must give)."""
    seed: int = 0
    """Seed of every random choice."""
    image_px: int = 128
    """Side of the synthetic images."""
    conversations: int = 2
    """Conversations about each clean image in conversations.jsonl (write_conversations); 0 writes none."""
    noise: float = 0.0
    """The share of the clean rows whose caption is wrong, as on the web: half of them another such row's
    (caption_kind "swapped"), half a line of page boilerplate ("off-topic"); images, URLs and attribute columns
    are those of the corpus without noise (same seed), so a clean one's test split evaluates models trained here."""


def _row(**values) -> dict:
    return {name: values.get(name) for name in COLUMNS}


def phrase(count: int, color: str, shape: str) -> str:
    number = ("an" if color[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
    return f"{number} {color} {shape}{'s' if count > 1 else ''}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], r: float, fill) -> None:
    x, y = center
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)


def _canvas(rng: np.random.Generator, px: int) -> Image.Image:
    """A light background with a smooth random texture: like photos, every scene gets its own
    low-frequency structure, which is what perceptual hashes see (flat backgrounds would make
    distinct scenes hash alike)."""
    base = rng.integers(190, 240, size=3)
    field = Image.fromarray(rng.normal(128, 40, size=(5, 5)).clip(0, 255).astype(np.uint8), "L")
    texture = np.asarray(field.resize((px, px), Image.BICUBIC), dtype=np.float32) - 128
    pixels = np.clip(base[None, None, :] + texture[:, :, None] * 1.0, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _place_group(draw, rng, shape, color, count, box, px) -> None:
    """Draw `count` shapes side by side inside box = (x0, y0, x1, y1) in [0, 1] units, one per equal
    slot and never touching: "two red circles" must show two circles, not one blob."""
    x0, y0, x1, y1 = (v * px for v in box)
    slot = (x1 - x0) / count
    r = min(rng.uniform(0.08, 0.13) * px, 0.45 * slot, 0.45 * (y1 - y0))  # 64 px stored: up to 8 px
    for i in range(count):
        x = rng.uniform(x0 + i * slot + r, x0 + (i + 1) * slot - r)
        y = rng.uniform(y0 + r, y1 - r)
        _draw_shape(draw, shape, (x, y), r, COLORS[color])


REGIONS = {  # relation -> (box of the first group, box of the second group)
    "left of": ((0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9)),
    "right of": ((0.5, 0.1, 1.0, 0.9), (0.0, 0.1, 0.5, 0.9)),
    "above": ((0.1, 0.0, 0.9, 0.5), (0.1, 0.5, 0.9, 1.0)),
    "below": ((0.1, 0.5, 0.9, 1.0), (0.1, 0.0, 0.9, 0.5)),
}


def describe(attrs: dict) -> str:
    """The scene in words: "three red circles", or "a red circle left of two blue squares"."""
    first = phrase(attrs["count"], attrs["color"], attrs["shape"])
    if attrs.get("relation") is None:
        return first
    return f"{first} {attrs['relation']} {phrase(attrs['count2'], attrs['color2'], attrs['shape2'])}"


def synthetic_scene(rng: np.random.Generator, px: int) -> tuple[Image.Image, dict]:
    """One scene: a single group ("three red circles") or two related groups; the caption frames
    the scene's description in one of SCENE_TEMPLATES."""
    image = _canvas(rng, px)
    draw = ImageDraw.Draw(image)
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    if rng.random() < 0.4:
        count = int(rng.integers(1, 4))
        _place_group(draw, rng, shape, color, count, (0.05, 0.1, 0.95, 0.9), px)
        attrs = dict(shape=shape, color=color, count=count, label=f"{color} {shape}")
        return image, dict(attrs, caption=str(rng.choice(SCENE_TEMPLATES)).format(describe(attrs)))
    shape2 = str(rng.choice(SHAPES))
    color2 = str(rng.choice([c for c in COLORS if c != color]))
    count, count2 = (int(v) for v in rng.integers(1, 3, size=2))
    relation = str(rng.choice(RELATIONS))
    first, second = REGIONS[relation]
    _place_group(draw, rng, shape, color, count, first, px)
    _place_group(draw, rng, shape2, color2, count2, second, px)
    attrs = dict(shape=shape, color=color, count=count, relation=relation, shape2=shape2,
                 color2=color2, count2=count2, label=f"{color} {shape}")
    return image, dict(attrs, caption=str(rng.choice(SCENE_TEMPLATES)).format(describe(attrs)))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (decompression-bomb guard test)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; decoding would need the rest
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Writer:
    """Writes image files under root/images and collects URL-list rows."""

    def __init__(self, root: Path, base_url: str):
        self.root, self.base_url, self.rows = root, base_url.rstrip("/"), []

    def add(self, relpath: str, data: bytes | None, **row) -> str:
        if data is not None:
            path = self.root / "images" / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        url = f"{self.base_url}/images/{relpath}"
        self.rows.append(_row(url=url, **row))
        return url


def _add_synthetic(w: _Writer, spec: SampleSpec, rng) -> list[tuple[bytes, dict]]:
    scenes = []
    for i in range(spec.synthetic):
        image, attrs = synthetic_scene(rng, spec.image_px)
        data = _jpeg(image)
        w.add(f"synthetic/{i:06d}.jpg", data, source="synthetic", caption_kind="generated", **attrs)
        scenes.append((data, attrs))
    return scenes


def _add_digits(w: _Writer, spec: SampleSpec, rng) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(min(spec.digits, len(digits.target))):
        pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white
        image = Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST)
        digit = int(digits.target[i])
        caption = str(rng.choice(DIGIT_TEMPLATES)).format(word=DIGIT_WORDS[digit], digit=digit)
        w.add(f"digits/{i:05d}.png", png_bytes(image), caption=caption, source="sklearn-digits",
              caption_kind="templated", label=str(digit))


def _photo_images():
    """(name, HxW[x3] uint8 array) for every bundled photo that ships with the packages."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    for name in PHOTO_CAPTIONS:
        if name.endswith(".jpg"):
            continue
        array = getattr(skimage.data, name)()
        yield name, (array.astype(np.uint8) * 255 if array.dtype == bool else array)
    sample = load_sample_images()
    for filename, array in zip(sample.filenames, sample.images):
        yield Path(filename).name, array


def _add_photos(w: _Writer) -> None:
    import skimage.data

    for name, array in _photo_images():
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((512, 512))
        w.add(f"photos/{Path(name).stem}.jpg", _jpeg(image), caption=PHOTO_CAPTIONS[name],
              source="photo", caption_kind="written", label=Path(name).stem)
    faces = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 in [0, 1]
    for i, face in enumerate(faces):
        is_face = i < len(faces) // 2
        caption = "a small grayscale photo of a face" if is_face else "a small grayscale patch of a scene without a face"
        image = Image.fromarray((face * 255).astype(np.uint8), "L")
        w.add(f"lfw/{i:03d}.png", png_bytes(image), caption=caption, source="lfw",
              caption_kind="templated", label="face" if is_face else "non-face")


def _add_defects(w: _Writer, scenes: list[tuple[bytes, dict]], rng) -> None:
    """Rows that ingest must reject, each with the reason it must give."""
    host = w.base_url.split("//", 1)[1].split("/", 1)[0]
    port = host.rsplit(":", 1)[1] if ":" in host else "80"

    def bad(relpath, data, defect, caption=_CAPTION):
        w.add(f"defects/{relpath}", data, caption=caption, source="defect", defect=defect)

    for i in range(3):
        bad(f"missing-{i}.jpg", None, "http_error")
    for i in range(2):
        bad(f"page-{i}.jpg", b"<!DOCTYPE html><html><body>not an image</body></html>", "not_an_image")
    bad("empty.jpg", b"", "empty_body")
    for i in range(2):
        data, attrs = scenes[i]
        bad(f"truncated-{i}.jpg", data[: len(data) // 2], "truncated_image", caption=attrs["caption"])
    bad("bomb.png", _bomb_png(), "too_many_pixels", caption="a huge blank image")
    bad("tiny.png", png_bytes(Image.new("RGB", (4, 4), (255, 0, 0))), "image_too_small", caption="a tiny red square")
    bad("strip.png", png_bytes(Image.new("RGB", (200, 20), (0, 0, 255))), "aspect_ratio", caption="a long blue strip")
    for i, text in enumerate(TRANSLATED):
        image, _ = synthetic_scene(rng, 128)
        bad(f"foreign-{i}.jpg", _jpeg(image), "language", caption=text)
    for i, caption in enumerate(["", "   "]):
        image, _ = synthetic_scene(rng, 128)
        bad(f"nocaption-{i}.jpg", _jpeg(image), "caption_empty", caption=caption)
    image, _ = synthetic_scene(rng, 128)
    bad("short.jpg", _jpeg(image), "caption_too_short", caption="circle")
    for url, defect in [
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("ftp://127.0.0.1/image.jpg", "scheme_not_allowed"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme_not_allowed"),
        ("http://", "malformed_url"),
        ("not a url", "malformed_url"),
        ("http://10.0.0.1/image.jpg", "blocked_network"),
        ("http://169.254.169.254/latest/meta-data/", "blocked_network"),
        (f"http://127.0.0.2:{port}/images/synthetic/000000.jpg", "blocked_network"),
        (f"http://[::1]:{port}/images/synthetic/000000.jpg", "blocked_network"),
    ]:
        w.rows.append(_row(url=url, caption=_CAPTION, source="defect", defect=defect))


def _add_copies(w: _Writer, scenes: list[tuple[bytes, dict]]) -> None:
    """Duplicates of earlier rows; appended last because the first occurrence is the one kept."""
    for i in range(3):  # byte-identical copies of earlier scenes under new URLs
        data, attrs = scenes[10 + i]
        w.add(f"defects/copy-{i}.jpg", data, caption=attrs["caption"], source="defect", defect="exact_duplicate")
    for i in range(3):  # the same scene re-encoded at a lower quality
        data, attrs = scenes[20 + i]
        recoded = _jpeg(Image.open(io.BytesIO(data)), quality=55)
        w.add(f"defects/recoded-{i}.jpg", recoded, caption=attrs["caption"], source="defect",
              defect="near_duplicate")
    originals = [row for row in w.rows if row["source"] == "synthetic"][:2]
    for row in originals:  # an earlier row's URL again
        w.rows.append(dict(row, defect="duplicate_url", source="defect"))


OFF_TOPIC = ("click here to see the full gallery", "free shipping on all orders today", "sign up for our weekly "
             "newsletter", "all rights reserved by the author", "download this stock photo now", "image may contain "
             "text and logo", "share this post with your friends", "read more about our privacy policy")
"""Captions of noisy rows that say nothing of their image (SampleSpec.noise): the boilerplate alt text web pages
carry."""


def _add_noise(w: _Writer, fraction: float, seed: int) -> None:
    """Wrong captions on `fraction` of the clean rows (SampleSpec.noise), drawn by their own generator so that
    everything else is the corpus without noise."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"noise must be in [0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 7])
    clean = [i for i, row in enumerate(w.rows) if not row["defect"]]
    chosen = rng.permutation(clean)[:round(fraction * len(clean))]
    swapped, off_topic = chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]
    captions = [w.rows[i]["caption"] for i in swapped]
    for k, i in enumerate(swapped):  # each takes the next one's caption: none keeps its own row's
        w.rows[i] = dict(w.rows[i], caption=captions[(k + 1) % len(captions)], caption_kind="swapped")
    for i in off_topic:
        w.rows[i] = dict(w.rows[i], caption=str(rng.choice(OFF_TOPIC)), caption_kind="off-topic")


def make_sample(root: str | Path, base_url: str, spec: SampleSpec | None = None) -> Path:
    """Write the sample corpus under `root`; return the path of its URL list (urls.parquet).

    `base_url` is where `mmpipe sample serve root` will answer, e.g. http://127.0.0.1:8765.
    """
    spec = spec or SampleSpec()
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    writer = _Writer(root, base_url)
    scenes = _add_synthetic(writer, spec, rng)
    if spec.digits:
        _add_digits(writer, spec, rng)
    if spec.photos:
        _add_photos(writer)
    if spec.defects:
        if len(scenes) < 40:
            raise ValueError("defects need at least 40 synthetic scenes to copy from (SampleSpec.synthetic)")
        _add_defects(writer, scenes, rng)
    order = rng.permutation(len(writer.rows))  # a web list is not sorted by kind
    writer.rows = [writer.rows[i] for i in order]
    if spec.defects:
        _add_copies(writer, scenes)
    if spec.noise:
        _add_noise(writer, spec.noise, spec.seed)
    table = pa.Table.from_pylist(writer.rows, schema=SCHEMA)
    url_list = root / "urls.parquet"
    pq.write_table(table, url_list)
    (root / "sample.json").write_text(json.dumps({"base_url": base_url, "spec": vars(spec),
                                                  "rows": table.num_rows}, indent=2))
    if spec.conversations:
        write_conversations(root, spec.conversations, spec.seed)
    return url_list


def write_conversations(root: str | Path, per_image: int, seed: int = 0) -> Path:
    """The corpus's questions and answers as instruction data: root/conversations.jsonl, in LLaVA's format,
    `per_image` conversations about each clean image of root/urls.parquet (its URL: ingested, a conversation's
    image lands in the split its URL gives the caption dataset). A conversation asks every question type the
    row answers, named by its type, in an order and seen wordings drawn for each (questions.training_questions);
    the held-out wordings stay out, for evaluation."""
    from mmcore.data.dataset import url_key
    from mmcore.data.synthetic.questions import training_questions

    root = Path(root)
    path = root / "conversations.jsonl"
    with open(path, "w") as out:
        for row in pq.read_table(root / "urls.parquet").to_pylist():
            if row["defect"]:
                continue
            row["key"] = url_key(row["url"])
            for epoch in range(per_image):
                turns = [m for i, q in enumerate(training_questions(row, seed, epoch)) for m in (
                    {"from": "human", "value": q.question if i else f"<image>\n{q.question}", "type": q.kind},
                    {"from": "gpt", "value": q.answer})]
                out.write(json.dumps({"id": f"{row['key']}-{epoch}", "image": row["url"], "conversations": turns})
                          + "\n")
    return path
