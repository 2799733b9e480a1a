"""The model bundle: the files a trained model is, as the trainer writes them and every loader reads them.

safetensors weights, the architecture's JSON config (model.json), the tokenizer and the preprocessing config;
no pickle, nothing else. A language model's bundle is also a Hugging Face directory (config.json,
model.safetensors or its shards, the tokenizer's files and chat template: models/causal_lm.py), which
transformers opens without mmpipe. A model trained with LoRA adapters registered unmerged (model.lora.merge
false; its model.json's `adapters` name the language model they adapt) holds the adapters and the rest of the
model, not that LM's weights: loading it takes the base's bundle. Needs no MLflow: the registry (registry.py)
stores and fetches bundles (an adapters bundle's base too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenizers import Tokenizer

from mmcore.models import build_model_for, load_pretrained, with_named_codes
from mmcore.models.preprocess import PreprocessConfig, Preprocessor


HF_CONFIG = "config.json"
"""The file that makes a bundle a Hugging Face directory."""
HF_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt")
"""What a Hugging Face directory may hold besides mmpipe's files: JSON, safetensors, a chat template and BPE
merges. Never a pickle (.bin, .pt, .pth, .pkl) or code."""


class BundleError(ValueError):
    """A directory that is not a model bundle, or holds more than one (a pickle, a link out of it)."""


@dataclass
class ModelBundle:
    """A registered model's files, as written by the trainer and read back by load_model."""

    weights: str
    config: str
    tokenizer: str
    preprocess: str

    @classmethod
    def write(cls, directory: Path, model: torch.nn.Module, config: dict, tokenizer_json: str,
              preprocess: PreprocessConfig) -> "ModelBundle":
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "save_pretrained"):  # a language model: a Hugging Face directory
            model.save_pretrained(directory, tokenizer_json)
        else:
            state, seen = {}, set()
            for key, value in model.state_dict().items():
                if config.get("adapters") and _from_base(key):
                    continue
                tensor = value.detach().float().cpu().contiguous()
                state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor  # tied: stored apart
                seen.add(tensor.data_ptr())
            save_file(state, directory / "weights.safetensors")
            (directory / "tokenizer.json").write_text(tokenizer_json)
        (directory / "model.json").write_text(json.dumps(config, indent=2))
        (directory / "preprocess.json").write_text(json.dumps(asdict(preprocess), indent=2))
        return cls.at(directory)

    @classmethod
    def at(cls, directory: Path) -> "ModelBundle":
        d = Path(directory)
        weights = "model.safetensors" if (d / HF_CONFIG).exists() else "weights.safetensors"
        return cls(str(d / weights), str(d / "model.json"), str(d / "tokenizer.json"), str(d / "preprocess.json"))

    @property
    def directory(self) -> Path:
        return Path(self.config).parent

    @property
    def hugging_face(self) -> bool:
        return (self.directory / HF_CONFIG).exists()

    def tokenizer_json(self) -> str:
        return Path(self.tokenizer).read_text()

    @property
    def base(self) -> str | None:
        """The registered language model whose weights this bundle's LoRA adapters adapt (None: a whole model)."""
        return json.loads(Path(self.config).read_text()).get("adapters", {}).get("base")

    def load(self, base: Path | None = None) -> tuple[torch.nn.Module, Preprocessor]:
        """The model in eval mode and its preprocessor; `base`: the bundle directory of `self.base`."""
        config = json.loads(Path(self.config).read_text())
        preprocess = PreprocessConfig(**json.loads(Path(self.preprocess).read_text()))
        tokenizer_json = with_named_codes(config, self.tokenizer_json())
        if self.hugging_face:
            model = load_pretrained(config, self.directory)
        else:
            model, _ = build_model_for(config, Tokenizer.from_str(tokenizer_json))
            if config.get("adapters"):
                self._load_adapted(model, config["adapters"], base)
            else:
                model.load_state_dict(load_file(self.weights))
        return model.eval(), Preprocessor(preprocess, tokenizer_json)

    def _load_adapted(self, model: torch.nn.Module, adapters: dict, base: Path | None) -> None:
        """The base LM's weights, then the adapters on it as they trained (tasks._train_lm), then the rest."""
        if base is None:
            raise BundleError(f"{self.directory} holds LoRA adapters on {adapters['base']}: load it through the "
                              "registry (mmcore.load_model or the pyfunc), which fetches that base")
        model.lm.load_parent(ModelBundle.at(base).load()[0].lm)
        model.lm.with_lora(adapters["rank"], adapters["alpha"], adapters["dropout"], adapters["target_modules"])
        model.lm.train_new_rows()
        missing, unexpected = model.load_state_dict(load_file(self.weights), strict=False)
        wrong = sorted(unexpected) + [key for key in missing if not _from_base(key) and not _new_row(key)]
        if wrong:
            raise BundleError(f"{self.directory}: its weights do not fit its architecture with adapters on "
                              f"{adapters['base']} ({', '.join(wrong[:5])})")

    @classmethod
    def checked(cls, directory: Path, uri: str) -> "ModelBundle":
        """The bundle in `directory` (downloaded from `uri`), refused with BundleError when the directory
        holds anything but the bundle's files (a pickle would run code when loaded) or a link out of it."""
        bundle = cls.at(directory)
        expected = {Path(path).name for path in asdict(bundle).values()}
        if bundle.hugging_face:  # the weights may be shards (model-00001-of-00002.safetensors)
            expected -= {Path(bundle.weights).name}
        for path in sorted(directory.rglob("*")):
            name = path.relative_to(directory)
            if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
                raise BundleError(f"refusing {uri}: its file {name} is a link ({path.resolve()}); a model's files "
                                  "must lie in its own directory")
            if str(name) not in expected and not (bundle.hugging_face and path.parent == directory
                                                  and path.name.endswith(HF_SUFFIXES)):
                allowed = f"{', '.join(sorted(expected))}" + (f" and {', '.join(HF_SUFFIXES)} files"
                                                               if bundle.hugging_face else "")
                raise BundleError(f"refusing {uri}: it holds {name}, which is not one of its bundle's files "
                                  f"({allowed}); mmpipe loads safetensors and JSON only, never a pickle")
        if bundle.hugging_face and not list(directory.glob("*.safetensors")):
            raise BundleError(f"cannot load {uri}: its Hugging Face directory holds no .safetensors weights")
        missing = sorted(expected - {p.name for p in directory.iterdir()})
        if missing:
            raise BundleError(f"cannot load {uri}: its files lack {', '.join(missing)}")
        return cls.at(directory)


def _from_base(key: str) -> bool:
    """A weight of an adapted model that its base LM holds: the LM's own, not its LoRA adapters' nor its new
    rows'."""
    return key.startswith("lm.") and "lora_" not in key and not _new_row(key)


def _new_row(key: str) -> bool:
    """The rows of the tokens an adapted LM's base lacks (absent from a bundle written before they trained:
    they stay at the base's start)."""
    return key.startswith("lm.new_rows.")
