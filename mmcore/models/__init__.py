"""Model architectures as data: configs/*.json looked up by name, built into plain nn.Modules."""

from __future__ import annotations

import json
from importlib import resources

from tokenizers import Tokenizer
from torch import nn

from mmcore.config import from_dict
from mmcore.data.tokenizer import (EOS, IMAGE, IMAGE_CODE, IMAGE_END, IMAGE_START, code_offset, image_code_tokens,
                                   with_tokens)
from mmcore.models.causal_lm import CausalLM, CausalLMConfig
from mmcore.models.clip import ClipConfig, ClipModel
from mmcore.models.flamingo import FlamingoConfig, FlamingoModel
from mmcore.models.imagetok import ImageTokenizer, ImageTokenizerConfig
from mmcore.models.llava import LlavaConfig, LlavaModel
from mmcore.models.preprocess import PreprocessConfig
from mmcore.models.pretrained_clip import PretrainedClip, PretrainedClipConfig
from mmcore.models.unified import UnifiedConfig, UnifiedModel

FAMILIES = {"clip": (ClipConfig, ClipModel), "llava": (LlavaConfig, LlavaModel),
            "flamingo": (FlamingoConfig, FlamingoModel), "vq": (ImageTokenizerConfig, ImageTokenizer),
            "unified": (UnifiedConfig, UnifiedModel), "lm": (CausalLMConfig, CausalLM),
            "hf-clip": (PretrainedClipConfig, PretrainedClip)}


CAPABILITIES = {"embed": ("encode_image", "encode_text"), "generate": ("generate",), "score": ("score",),
                "tokenize_image": ("encode", "decode"), "generate_image": ("generate_image",),
                "complete": ("complete", "text_nll")}
"""What a model can do, by the methods it has: evaluation picks suites and the registry picks the
pyfunc's signature by these, never by stage or family."""


def capabilities(model) -> set[str]:
    """What a model can do: the CAPABILITIES whose methods it has."""
    return {name for name, methods in CAPABILITIES.items() if all(hasattr(model, m) for m in methods)}


def list_models() -> list[str]:
    """Every architecture name, e.g. clip-debug, clip-demo, clip-vit-b16."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__package__).joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


def model_config(name: str) -> dict:
    """The JSON config of a named architecture; unknown names list the known ones."""
    path = resources.files(__package__).joinpath("configs", f"{name}.json")
    if not path.is_file():
        raise ValueError(f"model.name: unknown architecture {name!r}; known: {list_models()}")
    return json.loads(path.read_text())


def architecture(config: dict) -> dict:
    """A model config without its `family`, `description` and `adapters` (LoRA adapters registered apart from
    the LM they adapt: bundle.py): the fields of its family's config class."""
    return {k: v for k, v in config.items() if k not in ("family", "description", "adapters")}


def build_model_for(config: dict, tokenizer) -> tuple[nn.Module, PreprocessConfig]:
    """build_model sized for `tokenizer` (a tokenizers.Tokenizer): its vocabulary, the token that ends an
    answer (an imported language parent's chat eos_token, else <eos>), the ids of <image> and of a unified
    model's image span and codes; on an LM with its own chat template the text context grows by what the
    template adds to mmpipe's format."""
    language = config.get("language") or {}
    if language.get("chat_template"):
        from mmcore.data.instruct import TemplateChat
        from mmcore.models.decoder import DecoderConfig

        chat = TemplateChat(tokenizer, 10 ** 6, language["chat_template"], language.get("chat_tokens", {}))
        lm = config.get("lm", {})
        context = lm.get("context_length", DecoderConfig.context_length) + chat.overhead()
        config = {**config, "lm": {**lm, "context_length": context}}
    stop = language.get("chat_tokens", {}).get("eos_token") or EOS
    if config.get("family") == "unified":  # its image codes are named tokens of its tokenizer
        config = {**config, "text_vocab_size": code_offset(tokenizer)}
    model, preprocess = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id(stop))
    for attribute, token in (("image_id", IMAGE), ("start_id", IMAGE_START), ("end_id", IMAGE_END)):
        if hasattr(model, attribute) and tokenizer.token_to_id(token) is not None:
            setattr(model, attribute, tokenizer.token_to_id(token))
    return model, preprocess


def image_code_names(config: dict) -> list[str]:
    """A unified model config's image codes as its tokenizer names them (data.tokenizer.IMAGE_CODE)."""
    return image_code_tokens(from_dict(UnifiedConfig, architecture(config)).image_tokenizer.codebook_size)


def with_named_codes(config: dict, tokenizer_json: str) -> str:
    """The tokenizer of a registered model; a unified model's from before its image codes were named tokens gets
    them, at the ids its codes had (the tokenizer's size + c), so it loads as it was trained."""
    if config.get("family") != "unified" or Tokenizer.from_str(tokenizer_json).token_to_id(IMAGE_CODE.format(0)) \
            is not None:
        return tokenizer_json
    return with_tokens(tokenizer_json, image_code_names(config))


def build_model(config: dict, vocab_size: int, eos_id: int) -> tuple[nn.Module, PreprocessConfig]:
    """Model and matching preprocessing from a config dict (a named one or a registered model's)."""
    cfg, model_class = _family(config)
    cfg.set_vocab_size(vocab_size)
    return model_class(cfg, eos_id=eos_id), cfg.preprocess()


def load_pretrained(config: dict, directory) -> nn.Module:
    """A model saved as a Hugging Face directory (a language model, an imported CLIP), described by its model.json
    `config`."""
    cfg, model_class = _family(config)
    return model_class.from_pretrained(directory, cfg)


def _family(config: dict) -> tuple[object, type]:
    family = config.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model config: unknown family {family!r}; known: {sorted(FAMILIES)}")
    cfg_class, model_class = FAMILIES[family]
    return from_dict(cfg_class, architecture(config)), model_class
