"""The pyfunc a registered model is (loaded from code by MLflow, no pickle): its predict for every
capability (embeddings, answers, image codes, drawings), its signature and requirements.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from mmcore.bundle import ModelBundle
from mmcore.models import capabilities
from mmcore.models.preprocess import Preprocessor


class PyfuncModel(mlflow.pyfunc.PythonModel):
    """A contrastive model: predict(DataFrame with an `image` (bytes) or a `text` per row) -> (N, E)
    embeddings. A model that generates (fusion): predict(DataFrame with `image` and `prompt`) -> answers.
    An image tokenizer: predict(DataFrame with `image`) -> (N, tokens) codes. A language model:
    predict(DataFrame with `prompt`) -> answers. A model that draws
    (unified), with params {"output": "image"}: predict(DataFrame with `prompt`) -> PNG bytes."""

    def load_context(self, context):
        from mmcore.registry import open_bundle  # it imports this module

        bundle = ModelBundle.checked(Path(next(iter(context.artifacts.values()))).parent, "this model")
        self.model, self.preprocess = open_bundle(bundle, mlflow.get_tracking_uri())  # LoRA adapters: their base

    def predict(self, context, model_input: pd.DataFrame, params=None):
        can = capabilities(self.model)
        if "generate_image" in can and (params or {}).get("output", "text") == "image":
            return draw_rows(self.model, self.preprocess, model_input, params or {})
        if "generate" in can:
            return answer_rows(self.model, self.preprocess, model_input, params or {})
        if "complete" in can:
            return complete_rows(self.model, model_input, params or {})
        if "tokenize_image" in can:
            return tokenize_rows(self.model, self.preprocess, model_input)
        return embed_rows(self.model, self.preprocess, model_input)


GENERATION_PARAMS = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0}
DRAWING_PARAMS = {"output": "text", "image_temperature": 1.0, "top_k": 0, "guidance": 3.0, "seed": 0}
"""A model that draws: output "image" returns PNG bytes per prompt, sampled with these settings."""


def draw_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, params: dict) -> list[bytes]:
    """A PNG of the image drawn for each row's `prompt`; a row without one, or with a prompt too long,
    is a ValueError naming the row."""
    from PIL import Image

    from mmcore.data.images import png_bytes
    from mmcore.models.encode import draw_images

    prompts = rows["prompt"].tolist() if "prompt" in rows else [None] * len(rows)
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"row {row}: each row needs a `prompt` (text) to draw")
    settings = {**DRAWING_PARAMS, **{k: v for k, v in params.items() if k in DRAWING_PARAMS}}
    images = draw_images(model, preprocess, prompts, temperature=float(settings["image_temperature"]),
                         top_k=int(settings["top_k"]), guidance=float(settings["guidance"]), seed=int(settings["seed"]))
    return [png_bytes(Image.fromarray(image)) for image in images]


def answer_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, params: dict) -> list[str]:
    """The answer to each row's `prompt` about its `image` (encoded bytes), generated in batches;
    a row without them, with an undecodable image or a prompt too long is a ValueError naming the row."""
    from mmcore.models.encode import generate_answers

    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    prompts = rows["prompt"].tolist() if "prompt" in rows else [None] * len(rows)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, (bytes, bytearray)) or not isinstance(prompt, str):
            raise ValueError(f"row {row}: each row needs an `image` (encoded bytes) and a `prompt` (text)")
    blobs = [bytes(image) for image in images]
    _say_resized(preprocess, blobs, list(range(len(blobs))))
    settings = {**GENERATION_PARAMS, **{k: v for k, v in params.items() if k in GENERATION_PARAMS}}
    try:
        return generate_answers(model, preprocess, blobs, prompts, max_new_tokens=int(settings["max_new_tokens"]),
                                temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
    except (OSError, ValueError) as err:
        if str(err).startswith("row "):
            raise
        raise ValueError(f"row {_undecodable(preprocess, blobs)}: the image cannot be decoded ({err})") from err


def complete_rows(model, rows: pd.DataFrame, params: dict) -> list[str]:
    """A language model's answer to each row's `prompt` (a user message, in the model's chat template); a row
    without one is a ValueError naming the row."""
    prompts = rows["prompt"].tolist() if "prompt" in rows else [None] * len(rows)
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"row {row}: each row needs a `prompt` (text)")
    return model.complete(prompts, max_new_tokens=int(params.get("max_new_tokens",
                                                                 GENERATION_PARAMS["max_new_tokens"])))


def tokenize_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    """Each row's `image` (encoded bytes) as (N, tokens) int64 codes, in batches; a row without an
    image, or with one that does not decode, is a ValueError naming the row."""
    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    for row, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"row {row}: each row needs an `image` (encoded bytes)")
    blobs = [bytes(image) for image in images]
    _say_resized(preprocess, blobs, list(range(len(blobs))))
    out = np.zeros((len(rows), model.grid ** 2), np.int64)
    with torch.no_grad():
        for start in range(0, len(blobs), batch_size):
            chunk = blobs[start: start + batch_size]
            try:
                pixels = preprocess.images(chunk)
            except (OSError, ValueError) as err:
                raise ValueError(f"row {start + _undecodable(preprocess, chunk)}: the image cannot be decoded "
                                 f"({err})") from err
            out[start: start + len(chunk)] = model.encode(torch.from_numpy(pixels)).numpy()
    return out


def embed_rows(model, preprocess: Preprocessor, rows: pd.DataFrame) -> np.ndarray:
    """One embedding per row, in row order: of its `image` (encoded bytes) if it has one, else of its `text`.

    The images and the texts are each embedded in batches; a row with neither, or with an image
    that does not decode, is a ValueError naming the row.
    """
    from mmcore.models.encode import embed_images, embed_texts

    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    texts = rows["text"].tolist() if "text" in rows else [None] * len(rows)
    image_rows = [i for i, image in enumerate(images) if isinstance(image, (bytes, bytearray))]
    text_rows = [i for i, (image, text) in enumerate(zip(images, texts))
                 if not isinstance(image, (bytes, bytearray)) and isinstance(text, str)]
    if len(image_rows) + len(text_rows) < len(rows):
        first = sorted(set(range(len(rows))) - set(image_rows) - set(text_rows))[0]
        raise ValueError(f"row {first}: each row needs an `image` (encoded bytes) or a `text` value")
    out = np.zeros((len(rows), model.cfg.embed_dim), np.float32)
    if image_rows:
        blobs = [bytes(images[i]) for i in image_rows]
        _say_resized(preprocess, blobs, image_rows)
        try:
            out[image_rows] = embed_images(model, preprocess, blobs)
        except (OSError, ValueError) as err:  # PIL's errors do not say which image: find the row
            raise ValueError(f"row {image_rows[_undecodable(preprocess, blobs)]}: the image cannot be decoded "
                             f"({err})") from err
    if text_rows:
        out[text_rows] = embed_texts(model, preprocess, [texts[i] for i in text_rows])
    return out


def _say_resized(preprocess: Preprocessor, blobs: list[bytes], rows: list[int]) -> None:
    """Warn, naming the rows (`rows[i]` is blob i's), when images are not the model's size: the
    preprocessing resizes them to image_size x image_size, which changes what the model sees."""
    import io

    from PIL import Image

    size, odd = preprocess.cfg.image_size, {}
    for row, blob in zip(rows, blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:  # reads the header only
                if image.size != (size, size):
                    odd[row] = image.size
        except OSError:
            continue  # an undecodable image is an error, named when it is decoded
    if odd:
        shown = ", ".join(f"{row} ({w}x{h})" for row, (w, h) in list(odd.items())[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        warnings.warn(f"rows {shown}{more}: images resized to {size}x{size} pixels, the model's "
                      f"preprocessing image_size", stacklevel=3)


def _undecodable(preprocess: Preprocessor, blobs: list[bytes]) -> int:
    for index, blob in enumerate(blobs):
        try:
            preprocess.image(blob)
        except (OSError, ValueError):
            return index
    raise AssertionError("a batch that failed to decode decodes row by row")


def signature(model):
    """Contrastive: per row an `image` (encoded bytes) or a `text` -> (N, embed_dim) float32 embeddings.
    Generative: per row an `image` and a `prompt` -> answers; generation settings as params. A model
    that also draws: the image is optional, and output="image" returns PNG bytes.
    Image tokenizer: per row an `image` -> (N, tokens) int64 codes. Language model: per row a `prompt` -> its
    answer."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    can = capabilities(model)
    if "generate" in can:
        draws = "generate_image" in can  # then the image is optional (a prompt to draw) and the output text or PNG
        kinds = {str: "string", int: "long", float: "double"}
        settings = {**GENERATION_PARAMS, **(DRAWING_PARAMS if draws else {})}
        params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in settings.items()])
        inputs = Schema([ColSpec("binary", "image", required=not draws), ColSpec("string", "prompt")])
        return ModelSignature(inputs=inputs, outputs=None if draws else Schema([ColSpec("string")]), params=params)
    if "complete" in can:
        params = ParamSchema([ParamSpec("max_new_tokens", "long", GENERATION_PARAMS["max_new_tokens"])])
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                              params=params)
    if "tokenize_image" in can:
        return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                              outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, model.grid ** 2))]))
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.cfg.embed_dim))]))


def pyfunc_requirements() -> list[str]:
    """What a client needs to load the pyfunc: mmpipe (its code is the model's; it brings torch and the
    rest) and this MLflow. Stated, not inferred: MLflow's inference loads the model in a subprocess
    (about 8 s of every registration on 2 cores) and also listed cloudpickle and scipy, which it
    does not use."""
    from importlib.metadata import version

    return [f"mmpipe=={version('mmpipe')}", f"mlflow=={mlflow.__version__}"]
