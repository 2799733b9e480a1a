"""Every suite on tiny models whose right answers are known by construction (oracles)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmcore.data.config import SplitConfig, TokenizerConfig
from mmcore.data.dataset import DatasetVersion, ShardWriter, build_manifest
from mmcore.data.synthetic.corpus import DIGIT_WORDS, synthetic_scene
from mmcore.data.tokenizer import train_tokenizer
from mmcore.eval.contrastive import foils
from mmcore.eval import drawing, generative, reconstruction  # noqa: F401 - register their suites
from mmcore.eval.suites import SUITES, SuiteError, get_suite, suite
from mmcore.models import capabilities
from mmcore.models.preprocess import PreprocessConfig, Preprocessor

EXTRAS = pa.schema([("source", pa.string()), ("label", pa.string()), ("relation", pa.string()),
                    ("count", pa.int32()), ("color", pa.string()), ("shape", pa.string()),
                    ("count2", pa.int32()), ("color2", pa.string()), ("shape2", pa.string())])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """Synthetic scenes and digit-like images, all in the test split."""
    root = tmp_path_factory.mktemp("suite-data") / "v"
    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        image, attrs = synthetic_scene(rng, 64)
        records.append({"url": f"http://e.com/s{i}.png", "caption": attrs["caption"], "image": _png(image),
                        "source": "synthetic", **{k: attrs.get(k) for k in EXTRAS.names if k != "source"}})
    for digit in range(10):
        for j in range(3):
            pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            records.append({"url": f"http://e.com/d{digit}-{j}.png", "caption": f"a handwritten digit {DIGIT_WORDS[digit]}",
                            "image": _png(Image.fromarray(pixels)), "source": "sklearn-digits", "label": str(digit)})
    rows = pa.Table.from_pylist([{**{k: None for k in EXTRAS.names}, **r, "row": i, "width": 64, "height": 64,
                                  "sha256": hashlib.sha256(r["image"]).hexdigest()} for i, r in enumerate(records)])
    rows = rows.set_column(rows.schema.get_field_index("width"), "width", rows.column("width").cast(pa.int32()))
    rows = rows.set_column(rows.schema.get_field_index("height"), "height", rows.column("height").cast(pa.int32()))
    for name in ("count", "count2"):
        rows = rows.set_column(rows.schema.get_field_index(name), name, rows.column(name).cast(pa.int32()))
    root.mkdir()
    writer = ShardWriter(root, EXTRAS, 1000, SplitConfig(val_fraction=0.0, test_fraction=0.999999))
    writer.write(rows)
    shards = writer.close()
    tokenizer = train_tokenizer([r["caption"] for r in records] * 3, TokenizerConfig(vocab_size=400))
    tokenizer.save(str(root / "tokenizer.json"))
    pq.write_table(pa.table({"row": pa.array([], pa.int64())}), root / "rejects.parquet")
    manifest = build_manifest(root, shards, {"in": len(records), "kept": len(records), "rejected": {}},
                              {"extras": EXTRAS.names}, {}, writer.schema, 400)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion.open(root)


class Oracle(torch.nn.Module):
    """A 'model' that maps each image to the vector of a chosen text: its answers are known in advance."""

    family = "clip"

    def __init__(self, preprocess: Preprocessor, image_texts: dict[bytes, str], classes: list[str] = ()):
        super().__init__()
        self.preprocess, self.classes = preprocess, sorted(classes, key=len, reverse=True)
        self.by_pixels = {hashlib.sha1(preprocess.images([b])[0].tobytes()).digest(): t
                          for b, t in image_texts.items()}

    def vector(self, text: str) -> torch.Tensor:
        key = next((c for c in self.classes if c in text), text)  # a class name in the text stands for it
        seed = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
        v = torch.from_numpy(np.random.default_rng(seed).normal(size=64).astype(np.float32))
        return v / v.norm()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.vector(self.by_pixels[hashlib.sha1(x.numpy().tobytes()).digest()]) for x in images])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        texts = self.preprocess.tokenizer.decode_batch(tokens.tolist())
        return torch.stack([self.vector(t.strip()) for t in texts])


def _preprocess(version):
    return Preprocessor(PreprocessConfig(image_size=32, context_length=24), version.tokenizer_path.read_text())


def _table(version):
    return version.read("test").to_pylist()


def test_zero_shot_suites_score_an_oracle_right_and_a_shifted_one_wrong(version):
    pre = _preprocess(version)
    rows = _table(version)
    shapes = [r for r in rows if r["source"] == "synthetic" and r["relation"] is None]
    classes = sorted({r["label"] for r in shapes})
    oracle = Oracle(pre, {r["image"]: r["label"] for r in shapes}, classes)
    result = get_suite("zeroshot-shapes", {"embed"}).run(oracle, pre, version)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["chance"] == pytest.approx(1 / len(classes))
    assert result.figures["confusion_matrix.png"].startswith(b"\x89PNG")
    shifted = Oracle(pre, {r["image"]: classes[(classes.index(r["label"]) + 1) % len(classes)] for r in shapes},
                     classes)
    assert get_suite("zeroshot-shapes", {"embed"}).run(shifted, pre, version).metrics["accuracy"] == 0.0
    assert get_suite("zeroshot-shapes-heldout", {"embed"}).run(oracle, pre, version).metrics["accuracy"] == 1.0
    assert get_suite("zeroshot-shapes-heldout", {"embed"}).run(shifted, pre, version).metrics["accuracy"] == 0.0

    digits = [r for r in rows if r["source"] == "sklearn-digits"]
    words = {str(d): DIGIT_WORDS[d] for d in range(10)}
    oracle = Oracle(pre, {r["image"]: words[r["label"]] for r in digits}, list(words.values()))
    assert get_suite("zeroshot-digits", {"embed"}).run(oracle, pre, version).metrics["accuracy"] == 1.0
    assert get_suite("zeroshot-digits-heldout", {"embed"}).run(oracle, pre, version).metrics["accuracy"] == 1.0


def test_zeroshot_classifies_into_a_users_classes_file_and_names_what_is_wrong_with_one(version, tmp_path):
    """A user's classes file (a column, class names, templates): the rows labelled with a listed class are
    classified, the others counted; without the file the suite does not apply; a malformed file is named."""
    pre = _preprocess(version)
    digits = [r for r in _table(version) if r["source"] == "sklearn-digits"]
    names = ["3", "5", "7"]
    classes = tmp_path / "digits.json"
    classes.write_text(json.dumps({"column": "label", "classes": names, "templates": ["the digit {}.", "a {}"]}))
    oracle = Oracle(pre, {r["image"]: f"the digit {r['label']}." for r in digits}, names)
    suite = get_suite("zeroshot", {"embed"})
    assert suite.not_applicable(version) == \
        "it needs --classes (mmpipe evaluate or promote; the flows' gate: classes)"
    assert suite.not_applicable(version, {"classes": str(classes)}) is None
    result = suite.run(oracle, pre, version, classes=str(classes))
    assert result.metrics["accuracy"] == 1.0 and result.metrics["n"] == 9
    assert result.metrics["unlabelled"] == len(_table(version)) - 9, "rows of other labels (and none) counted"
    shifted = Oracle(pre, {r["image"]: f"the digit {names[(names.index(r['label']) + 1) % 3]}."
                           for r in digits if r["label"] in names}, names)
    assert suite.run(shifted, pre, version, classes=str(classes)).metrics["accuracy"] == 0.0
    classes.write_text(json.dumps({"column": "label", "classes": names, "templates": ["no placeholder"]}))
    with pytest.raises(SuiteError, match=r"digits.json: templates missing or malformed"):
        suite.run(oracle, pre, version, classes=str(classes))


def test_open_answers_are_compared_as_vqav2_normalises_them():
    from mmcore.eval.generative import vqa_normalize

    assert vqa_normalize("A cup of coffee.") == vqa_normalize("cup of coffee") == "cup of coffee"
    assert vqa_normalize("Two dogs!") == "2 dogs" and vqa_normalize("1,000 metres; 3.5 km.") == "1000 metres 3.5 km"
    assert vqa_normalize("Yes, it is.") == "yes it is" != vqa_normalize("yes it is not")


def test_heldout_prompt_templates_use_words_that_no_corpus_caption_has(tmp_path):
    """The held-out suites measure generalisation only if their wording is new to the model."""
    import re

    from mmcore.data.synthetic.corpus import SampleSpec, make_sample
    from mmcore.eval.contrastive import (DIGIT_TEMPLATES, HELDOUT_DIGIT_TEMPLATES, HELDOUT_SHAPE_TEMPLATES,
                                         SHAPE_TEMPLATES)

    url_list = make_sample(tmp_path, "http://127.0.0.1:1", SampleSpec(synthetic=400, digits=600))
    captions = pq.read_table(url_list, columns=["caption"]).column("caption").to_pylist()
    corpus_words = {w for caption in captions if caption for w in re.findall(r"[a-z]+", caption.lower())}

    def fixed_words(template: str) -> set[str]:
        return set(re.findall(r"[a-z]+", re.sub(r"\{\w*\}", " ", template))) - {"a", "an", "the", "of", "in"}

    for template in HELDOUT_SHAPE_TEMPLATES + HELDOUT_DIGIT_TEMPLATES:
        assert fixed_words(template) and not fixed_words(template) & corpus_words, template
    # the usual prompts do share the corpus's wording (that is the difference being measured)
    assert all(fixed_words(t) <= corpus_words for t in DIGIT_TEMPLATES if fixed_words(t))
    assert fixed_words(" ".join(SHAPE_TEMPLATES)) - corpus_words  # "picture" and "one" are not in captions


def test_retrieval_suite_on_an_oracle(version):
    pre = _preprocess(version)
    rows = _table(version)
    oracle = Oracle(pre, {r["image"]: r["caption"] for r in rows})
    result = get_suite("retrieval", {"embed"}).run(oracle, pre, version)
    assert result.metrics["image_to_text_recall_1"] == 1.0 and result.metrics["text_to_image_recall_1"] == 1.0
    assert result.metrics["chance_image_to_text_recall_1"] < 0.2 and result.metrics["chance_text_to_image_recall_1"] < 0.2
    assert result.figures["examples.png"].startswith(b"\x89PNG")


def test_compositional_probe_prefers_what_the_model_sees(version):
    pre = _preprocess(version)
    pairs = [r for r in _table(version) if r["relation"]]
    truthful = Oracle(pre, {r["image"]: r["caption"] for r in pairs})
    result = get_suite("compositional", {"embed"}).run(truthful, pre, version)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["n"] == len(pairs)
    fooled = Oracle(pre, {r["image"]: foils(r)["swap_relation"] for r in pairs})
    fooled_result = get_suite("compositional", {"embed"}).run(fooled, pre, version)
    assert fooled_result.metrics["swap_relation_accuracy"] == 0.0


def test_foils_keep_the_words_and_change_the_meaning():
    row = {"count": 1, "color": "red", "shape": "circle", "relation": "left of", "count2": 2, "color2": "blue",
           "shape2": "square", "caption": "a red circle left of two blue squares"}
    assert foils(row) == {"swap_attributes": "a blue circle left of two red squares",
                          "swap_relation": "a red circle right of two blue squares"}
    framed = dict(row, caption="clip art of a red circle left of two blue squares")
    assert foils(framed)["swap_relation"] == "clip art of a red circle right of two blue squares"


def test_suite_registry_is_open_and_checks_what_the_model_can_do(version):
    @suite("always-one", {"generate"}, "a suite for models that generate")
    def always_one(model, preprocess, data):  # pragma: no cover - never run here
        raise AssertionError

    try:
        with pytest.raises(SuiteError, match="needs a model that can generate; this one can embed"):
            get_suite("always-one", capabilities(Oracle(_preprocess(version), {})))
        with pytest.raises(SuiteError, match="unknown suite 'nope'"):
            get_suite("nope", {"embed"})
    finally:
        SUITES.pop("always-one")


def test_suites_of_the_sample_corpus_do_not_apply_to_a_dataset_without_its_columns(tmp_path, version):
    """A web dataset (no attribute columns): the corpus's suites say why they do not apply; the others do."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(version.path, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["source"]["extras"] = []
    (bare / "manifest.json").write_text(json.dumps(manifest))
    bare = DatasetVersion.open(bare)
    for name in ("zeroshot-shapes", "zeroshot-digits-heldout", "compositional", "vqa", "text-to-image"):
        reason = SUITES[name].not_applicable(bare)
        assert reason and bare.id in reason and "color, color2, count" in reason and "sample corpus" in reason, name
        assert SUITES[name].not_applicable(version) is None, name
    assert all(SUITES[name].not_applicable(bare) is None for name in ("retrieval", "reconstruction", "captioning"))
    with pytest.raises(SuiteError, match="no column\\(s\\) \\['label', 'source', 'relation'\\]"):
        get_suite("zeroshot-shapes", {"embed"}).run(None, None, bare)  # run regardless: still a clear error


class CopyTokenizer(torch.nn.Module):
    """An image 'tokenizer' whose one code per image indexes a copy of it: decode returns the image
    shifted by `error` grey levels, so the reconstruction's PSNR is known in advance."""

    def __init__(self, error: int, codebook_size: int):
        super().__init__()
        self.error, self.codebook_size, self.grid, self.seen = error, codebook_size, 1, []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += list(images)
        return torch.arange(len(self.seen) - len(images), len(self.seen))[:, None]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.seen[int(c)] for c in codes[:, 0]]) - self.error * 2 / 255


def test_reconstruction_suite_measures_psnr_per_source_and_codebook_use(version):
    pre = Preprocessor(PreprocessConfig(image_size=32, context_length=0), version.tokenizer_path.read_text())
    suite_ = get_suite("reconstruction", {"tokenize_image"})
    n = len(_table(version))
    exact = suite_.run(CopyTokenizer(0, 2 * n), pre, version)
    assert exact.metrics["psnr"] == 100.0 and exact.metrics["codebook_usage"] == 0.5
    assert exact.metrics["tokens_per_image"] == 1 and exact.metrics["n"] == n
    assert exact.metrics["codebook_perplexity"] == pytest.approx(n)
    off_by_one = suite_.run(CopyTokenizer(1, 2 * n), pre, version).metrics  # 20 log10(255) = 48.13 dB
    assert 47.5 < off_by_one["psnr_synthetic"] < 49.5 and 47.5 < off_by_one["psnr_sklearn_digits"] < 49.5
    assert {"reconstructions_synthetic.png", "reconstructions_sklearn-digits.png"} <= set(exact.figures)
    assert exact.figures["reconstructions_synthetic.png"].startswith(b"\x89PNG")
