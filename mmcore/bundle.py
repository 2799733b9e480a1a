"""The model bundle: the files a trained model is, as the trainer writes them and every loader reads them.

safetensors weights, the architecture's JSON config, the tokenizer and the preprocessing config; no
pickle, nothing else. Needs no MLflow: the registry (registry.py) stores and fetches bundles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmcore.data.tokenizer import EOS, load_tokenizer
from mmcore.models import build_model
from mmcore.models.preprocess import PreprocessConfig, Preprocessor


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
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "weights.safetensors")
        (directory / "model.json").write_text(json.dumps(config, indent=2))
        (directory / "tokenizer.json").write_text(tokenizer_json)
        (directory / "preprocess.json").write_text(json.dumps(asdict(preprocess), indent=2))
        return cls.at(directory)

    @classmethod
    def at(cls, directory: Path) -> "ModelBundle":
        d = Path(directory)
        return cls(str(d / "weights.safetensors"), str(d / "model.json"), str(d / "tokenizer.json"),
                   str(d / "preprocess.json"))

    def load(self) -> tuple[torch.nn.Module, Preprocessor]:
        tokenizer = load_tokenizer(self.tokenizer)
        config = json.loads(Path(self.config).read_text())
        model, _ = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
        model.load_state_dict(load_file(self.weights))
        preprocess = PreprocessConfig(**json.loads(Path(self.preprocess).read_text()))
        return model.eval(), Preprocessor(preprocess, Path(self.tokenizer).read_text())

    @classmethod
    def checked(cls, directory: Path, uri: str) -> "ModelBundle":
        """The bundle in `directory` (downloaded from `uri`), refused with BundleError when the directory
        holds anything but the bundle's files (a pickle would run code when loaded) or a link out of it."""
        expected = {Path(path).name for path in asdict(cls.at(directory)).values()}
        for path in sorted(directory.rglob("*")):
            name = path.relative_to(directory)
            if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
                raise BundleError(f"refusing {uri}: its file {name} is a link ({path.resolve()}); a model's files "
                                  "must lie in its own directory")
            if str(name) not in expected:
                raise BundleError(f"refusing {uri}: it holds {name}, which is not one of its bundle's files "
                                  f"({', '.join(sorted(expected))}); mmpipe loads safetensors and JSON only, never "
                                  "a pickle")
        missing = sorted(expected - {p.name for p in directory.iterdir()})
        if missing:
            raise BundleError(f"cannot load {uri}: its files lack {', '.join(missing)}")
        return cls.at(directory)
