"""`mmpipe models import`: a Hugging Face checkpoint (a repo id, or a local directory in that format) registered
as a version of a stage's model, tagged with its source, its revision and the sha256 of every weight file.

Safetensors only: a checkpoint whose weights are pickles (.bin, .pt, ...) is refused, naming the file. The
registered bundle is the checkpoint's own files (config, weights, tokenizer, chat template) and mmpipe's
model.json and preprocess.json, so that it loads like a model mmpipe trained: a causal LM into the language stage
(models/causal_lm.py), a CLIP or SigLIP into the contrastive stage (models/pretrained_clip.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from mmcore import console, storage

WEIGHT_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model")
"""What is fetched from a repo: weights as safetensors, configs, the tokenizer's files and chat template."""
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
"""The model's files copied into the bundle as they are (with its *.safetensors and a CLIP's image processor
file); the tokenizer is saved anew."""
CONFIG_NOT_COPIED = ("model_type", "architectures", "transformers_version", "vocab_size", "dtype", "torch_dtype")
"""A checkpoint's config fields an LM config does not take verbatim (its `extra`): the model type is its
`architecture`, the vocabulary is sized from the tokenizer, the weights are float32 in training."""
IMPORT_EXPERIMENT = "mmpipe-import"
PLAIN_CHAT_TEMPLATE = ("{{ bos_token if bos_token }}{% for message in messages %}"
                       "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
                       "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")
"""The chat format given to an imported LM that brings none (a base model)."""


def fetch(source: str, revision: str | None = None) -> tuple[Path, str]:
    """A local checkpoint directory for `source` and its revision: the directory itself ("local", or the
    revision asked), or a Hub repo's snapshot of the checkpoint's files (the commit it resolved to)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, revision or "local"
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ValueError(f"{source}: not a directory, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, revision=revision, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as err:  # noqa: BLE001 - offline mode, no network, unknown repo or revision
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot download {source} from the Hugging Face Hub ({reason}); without a network, "
                         "import a local directory in Hugging Face format (what save_pretrained writes)") from None
    return snapshot, snapshot.name


def check_weights(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files; a checkpoint with only pickled weights is refused, naming one."""
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in WEIGHT_PICKLES)
        if pickles:
            raise ValueError(f"{directory / pickles[0]}: pickled weights are not loaded (they can run code); "
                             "mmpipe imports safetensors only: convert the checkpoint (save_pretrained writes them)")
        raise ValueError(f"{directory}: no .safetensors weights")
    return weights


def _config(directory: Path):
    """The checkpoint's transformers config; an error names what transformers cannot read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{directory}: transformers cannot read its config.json ({str(err).splitlines()[0]})") \
            from None


def _copy_model_files(directory: Path, weights: list[Path], out: Path, names=MODEL_FILES) -> None:
    out.mkdir(parents=True)
    for name in [*names, *(path.name for path in weights)]:
        if (directory / name).is_file():
            shutil.copyfile(directory / name, out / name)


def _write_card(out: Path, card: dict, preprocess) -> None:
    (out / "model.json").write_text(json.dumps(card, indent=2))
    (out / "preprocess.json").write_text(json.dumps(asdict(preprocess), indent=2))


def language_bundle(directory: Path, weights: list[Path], out: Path) -> list[str]:
    """Write `directory`'s causal LM (its `weights` files: check_weights) into `out` as a language model bundle;
    returns what was changed or added to it (said to the user). Errors name what transformers cannot load."""
    from transformers import AutoTokenizer

    from mmcore.models.causal_lm import CausalLM, CausalLMConfig, card
    from mmcore.models.preprocess import PreprocessConfig

    config = _config(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    notes = []
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{directory}: its tokenizer names no end-of-sequence token (eos_token); generation could "
                         "not stop. Set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"its tokenizer has no padding token: padding with {tokenizer.eos_token}")
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        notes.append("it brings no chat template: turns are written 'User: ...' / 'Assistant: ...'")
    _copy_model_files(directory, weights, out)
    tokenizer.save_pretrained(out)
    text = config.get_text_config()
    cfg = CausalLMConfig(architecture=config.model_type, context_length=int(text.max_position_embeddings),
                         width=int(text.hidden_size), layers=int(text.num_hidden_layers),
                         heads=int(text.num_attention_heads), vocab_size=int(text.vocab_size),
                         # the whole config, so that a fusion model builds this very architecture around it
                         extra={k: v for k, v in config.to_dict().items() if k not in CONFIG_NOT_COPIED},
                         chat_template=tokenizer.chat_template,  # what a fusion model on it speaks
                         chat_tokens={role: getattr(tokenizer, role) for role in ("bos_token", "eos_token", "pad_token")
                                      if getattr(tokenizer, role)})
    try:
        CausalLM.from_pretrained(out, cfg)
    except ValueError as err:
        raise ValueError(f"{directory}: not a causal language model transformers can load "
                         f"({str(err).strip().splitlines()[0][:200]})") from None
    _write_card(out, {**card(cfg), "description": f"imported {config.model_type}"},
                PreprocessConfig(0, cfg.context_length))
    return notes


def contrastive_bundle(directory: Path, weights: list[Path], out: Path) -> list[str]:
    """Write `directory`'s CLIP or SigLIP into `out` as a contrastive model bundle: its weights, config and
    image processor's file, its tokenizer with the padding it was trained with (to the text model's positions),
    the images' normalisation; returns what was assumed (said to the user)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mmcore.models.pretrained_clip import ARCHITECTURES, NORMALISATION, PretrainedClip, PretrainedClipConfig, card

    config = _config(directory)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"{directory}: a {config.model_type} checkpoint; the contrastive stage imports CLIP and "
                         "SigLIP ones (CLIPModel, SiglipModel)")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    notes = []
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{directory}: its tokenizer names neither a padding nor an end-of-sequence token; set "
                             "pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"its tokenizer has no padding token: padding with {tokenizer.eos_token}")
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        fields = json.loads(processor.read_text())
        mean, std = fields["image_mean"], fields["image_std"]
    else:
        mean, std = NORMALISATION[config.model_type]
        notes.append(f"it brings no preprocessor_config.json: images are normalised with mean {mean}, std {std} "
                     f"({config.model_type}'s)")
    _copy_model_files(directory, weights, out, (*MODEL_FILES, processor.name))
    tokenizer.save_pretrained(out)
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))  # the padding the preprocessing reads
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    backend.save(str(out / "tokenizer.json"))
    cfg = PretrainedClipConfig.of(config, tokenizer, mean, std)
    PretrainedClip.from_pretrained(out, cfg)
    _write_card(out, {**card(cfg), "description": f"imported {config.model_type}"}, cfg.preprocess())
    return notes


BUNDLERS = {"language": language_bundle, "contrastive": contrastive_bundle}
"""The stages a checkpoint can be imported into, and how each makes its bundle."""


def import_model(source: str, stage: str, revision: str | None = None, alias: str = "candidate",
                 tracking_uri: str | None = None) -> str:
    """Register `source` (a repo id or a local Hugging Face directory) as a version of the stage's model with
    `alias`; returns models:/name/version. Nothing is registered when the checkpoint is refused."""
    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig

    if stage not in BUNDLERS:
        raise ValueError(f"--stage: checkpoints import into {' or '.join(BUNDLERS)}, not {stage!r}")
    uri = tracking_uri or tracking.resolve_uri(TrackingConfig())
    tracking.check_reachable(uri)
    directory, revision = fetch(source, revision)
    weights = check_weights(directory)
    name = f"mmpipe-{stage}"
    with tempfile.TemporaryDirectory(prefix="mmpipe-import-") as scratch:
        bundle = Path(scratch) / "bundle"
        for note in BUNDLERS[stage](directory, weights, bundle):
            console.say(f"{source}: {note}")
        tags = {"stage": stage, "source": source, "source_revision": revision,
                **{f"sha256.{path.name}": storage.sha256(path) for path in weights}}
        run_id = tracking.create_import_run(uri, IMPORT_EXPERIMENT, source, revision, stage)
        try:
            version = registry.log_and_register(uri, run_id, bundle, name, alias, tags)
        except BaseException:
            tracking.end_run(uri, run_id, ok=False)
            raise
        tracking.end_run(uri, run_id, ok=True)
    console.say(f"imported {source} (revision {revision}, {len(weights)} weight file(s)) as models:/{name}/{version} "
                f"(alias {alias}), MLflow run {run_id}")
    return f"models:/{name}/{version}"

