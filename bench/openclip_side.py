"""The open_clip side of bench/vs_openclip.py: loss and model parity, and the demo recipe trained with open_clip.

Runs with .venv-openclip's python (torch 2.14.1, open-clip-torch 3.3.0; `make bench-openclip` builds it),
never the project's venv. It imports no Ray, DeepSpeed or MLflow: from mmcore it takes only modules that
need torch alone (losses, models, the RunConfig and the DeepSpeed config builder), so the recipe is read
from the code fit() runs, not copied.

--parity: our ClipLoss / SigLipLoss against open_clip.loss.ClipLoss / SigLipLoss on the same random unit-norm
  features, logit scale and bias, one process, float32 and float64: loss values and gradients (features,
  log scale, bias). Then our clip-demo model against open_clip's built from the same config with our weights
  copied in: the embeddings, which shows the two architectures compute the same function.
--run-config FILE: open_clip's CLIP with our architecture, trained with open_clip's ClipLoss the way
  open_clip's training loop does (a torch DataLoader decoding in worker processes, AdamW, grad clipping),
  with the global batch, steps, optimizer and schedule of that RunConfig (read from the DeepSpeed config
  fit() builds from it), fp32, torch threads = cores, on the same dataset version's train split.
Writes parity.json or train.json under --out (and prints it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import warmup_cosine  # noqa: E402
from mmcore.config import RunConfig, from_dict  # noqa: E402
from mmcore.data.dataset import DatasetVersion  # noqa: E402
from mmcore.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS  # noqa: E402
from mmcore.losses import ClipLoss, SigLipLoss  # noqa: E402
from mmcore.models import build_model, model_config  # noqa: E402
from mmcore.models.clip import ClipConfig, ClipModel  # noqa: E402
from mmcore.tasks import build_task  # noqa: E402
from mmcore.train.deepspeed_config import build_ds_config  # noqa: E402

SKIPPED_STEPS = 10  # throughput counts the steps after these (start-up, as our first logged window)
PARITY_BATCH, PARITY_DIM = 64, 128  # the loss parity's random features

# Our state-dict names -> open_clip's (models/towers.py, clip.py, transformer.py vs open_clip's CLIP).
WHOLE_NAMES = {
    "visual.cls": "visual.class_embedding", "visual.pos": "visual.positional_embedding",
    "text.pos": "positional_embedding", "image_proj.weight": "visual.proj", "text_proj.weight": "text_projection",
}
NAME_PARTS = [
    ("visual.patchify.", "visual.conv1."), ("text.embed.", "token_embedding."), ("text.ln_final.", "ln_final."),
    ("text.transformer.", "transformer."), (".blocks.", ".resblocks."), (".ln1.", ".ln_1."), (".ln2.", ".ln_2."),
    (".attn.qkv.weight", ".attn.in_proj_weight"), (".attn.qkv.bias", ".attn.in_proj_bias"),
    (".attn.out.", ".attn.out_proj."), (".mlp.0.", ".mlp.c_fc."), (".mlp.2.", ".mlp.c_proj."),
]


def openclip_config(cfg: ClipConfig, eos_id: int, pad_id: int) -> dict:
    """open_clip's model config (the JSON of its model_configs/) for one of our CLIP architectures."""
    vision, text = cfg.vision, cfg.text
    if vision.registers:
        raise ValueError(f"vision.registers={vision.registers}: open_clip's ViT has no register tokens")
    gelu_tanh = {"approximate": "tanh"}  # ours: nn.GELU(approximate="tanh"); open_clip's default is exact GELU
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        # pool_type "tok" (the default): the CLS token, as ours
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                       "layers": vision.layers, "head_width": vision.width // vision.heads,
                       "mlp_ratio": vision.mlp_ratio, "act_kwargs": gelu_tanh},
        # pool_type "eos" pools at the first eos_id, as ours. The default "argmax" takes the highest token id
        # (OpenAI's BPE gives <end_of_text> the last id); our <eos> is id 3, so argmax would pool a word.
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
                     "act_kwargs": gelu_tanh, "pool_type": "eos", "eos_id": eos_id, "pad_id": pad_id},
    }


def openclip_model(arch: str, cfg: ClipConfig, eos_id: int, pad_id: int, out: Path) -> nn.Module:
    """open_clip's CLIP for our architecture `arch`, registered as mmpipe-<arch> from a JSON written under `out`."""
    name = f"mmpipe-{arch}"
    path = out / f"{name}.json"
    path.write_text(json.dumps(openclip_config(cfg, eos_id, pad_id), indent=2))
    open_clip.add_model_config(path)
    return open_clip.create_model(name, output_dict=True)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- parity -------------------------------------------------------------------------------------------------

def gradients(loss: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


def loss_parity(name: str, dtype: torch.dtype) -> dict:
    """Our loss and open_clip's on the same unit-norm features, scale and bias: values and gradients.

    Conventions matched explicitly: ours holds log(scale) as a parameter and exponentiates it inside (ClipLoss
    also clamps the scale at 100, far above the 1/0.07 used here); open_clip takes the exponentiated scale, so
    it gets exp() of an equal leaf. SigLIP's bias is added to the logits by both. Initial values are ours
    (CLIP 1/0.07; SigLIP 10 and -10, the same as open_clip's SigLIP defaults).
    """
    generator = torch.Generator().manual_seed(0)
    shape = (PARITY_BATCH, PARITY_DIM)
    features = {k: F.normalize(torch.randn(shape, generator=generator, dtype=dtype), dim=-1).requires_grad_()
                for k in ("image_features", "text_features")}
    ours = (ClipLoss() if name == "clip" else SigLipLoss()).to(dtype)
    ours_inputs = {**features, "logit_scale": ours.logit_scale}
    theirs_inputs = {k: v.detach().clone().requires_grad_() for k, v in ours_inputs.items()}
    if name == "clip":
        theirs_loss = open_clip.loss.ClipLoss()(theirs_inputs["image_features"], theirs_inputs["text_features"],
                                                theirs_inputs["logit_scale"].exp())
    else:
        ours_inputs["logit_bias"] = ours.logit_bias
        theirs_inputs["logit_bias"] = ours.logit_bias.detach().clone().requires_grad_()
        theirs_loss = open_clip.loss.SigLipLoss()(theirs_inputs["image_features"], theirs_inputs["text_features"],
                                                  theirs_inputs["logit_scale"].exp(), theirs_inputs["logit_bias"])
    ours_loss = ours(features["image_features"], features["text_features"])["loss"]
    ours_grads, theirs_grads = gradients(ours_loss, ours_inputs), gradients(theirs_loss, theirs_inputs)
    return {"ours": ours_loss.item(), "open_clip": theirs_loss.item(),
            "abs_diff": abs(ours_loss.item() - theirs_loss.item()),
            "grad_max_abs_diff": {k: (ours_grads[k] - theirs_grads[k]).abs().max().item() for k in ours_grads}}


def copy_weights(ours: ClipModel, theirs: nn.Module) -> None:
    """Our weights into open_clip's CLIP. open_clip's patch conv has no bias: ours is zeroed to match."""
    with torch.no_grad():
        ours.visual.patchify.bias.zero_()
    target = theirs.state_dict()
    mapped = {}
    for key, value in ours.state_dict().items():
        if key == "visual.patchify.bias":
            continue
        name = WHOLE_NAMES.get(key, key)
        for old, new in NAME_PARTS:
            name = name.replace(old, new)
        mapped[name] = value.T if key.endswith("_proj.weight") else value.reshape(target[name].shape)
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert missing == ["logit_scale"] and not unexpected, (missing, unexpected)  # the scale lives in our loss


def model_parity(out: Path, batch: int = 16) -> dict:
    """clip-demo in both libraries with the same weights: max |difference| of the unit-norm embeddings."""
    arch, vocab, eos_id = model_config("clip-demo"), 1000, SPECIAL_TOKENS.index(EOS)  # any vocabulary: random ids
    ours, _ = build_model(arch, vocab, eos_id)
    theirs = openclip_model("clip-demo", ours.cfg, eos_id, SPECIAL_TOKENS.index(PAD), out)
    copy_weights(ours, theirs)
    generator = torch.Generator().manual_seed(0)
    size, length = ours.cfg.vision.image_size, ours.cfg.text.context_length
    images = torch.randn(batch, 3, size, size, generator=generator)
    tokens = torch.randint(len(SPECIAL_TOKENS), vocab, (batch, length), generator=generator)  # words only
    ends = torch.randint(2, length, (batch,), generator=generator)  # <bos> words <eos> <pad>...
    tokens[:, 0] = SPECIAL_TOKENS.index(BOS)
    tokens[torch.arange(batch), ends] = eos_id
    tokens[torch.arange(length) > ends[:, None]] = SPECIAL_TOKENS.index(PAD)
    result = {}
    for dtype in (torch.float32, torch.float64):
        ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
        with torch.no_grad():
            a, b = ours(images.to(dtype), tokens), theirs(images.to(dtype), tokens)
        result[str(dtype).removeprefix("torch.")] = {
            k: (a[k] - b[k]).abs().max().item() for k in ("image_features", "text_features")}
    return result


def parity(out: Path) -> dict:
    losses = {name: {str(dtype).removeprefix("torch."): loss_parity(name, dtype)
                     for dtype in (torch.float32, torch.float64)} for name in ("clip", "siglip")}
    return {"losses": losses, "model": model_parity(out), "batch": PARITY_BATCH, "embed_dim": PARITY_DIM,
            "torch": torch.__version__, "open_clip": open_clip.__version__}


# --- training -----------------------------------------------------------------------------------------------

class ParquetPairs(torch.utils.data.Dataset):
    """The train split's rows, decoded and tokenized per item in the loader's workers (as open_clip's CsvDataset)."""

    def __init__(self, version: DatasetVersion, transform: Callable, context_length: int):
        table = version.read("train", columns=["image", "caption"])
        self.images, self.captions = table.column("image").to_pylist(), table.column("caption").to_pylist()
        self.transform, self.context_length = transform, context_length
        self.tokenizer_json = version.tokenizer_path.read_text()
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """Built in each worker: padded and truncated to the context length, as our Preprocessor does."""
        if self._tokenizer is None:
            tokenizer = Tokenizer.from_str(self.tokenizer_json)
            tokenizer.enable_truncation(self.context_length)
            tokenizer.enable_padding(length=self.context_length, pad_id=tokenizer.token_to_id(PAD), pad_token=PAD)
            self._tokenizer = tokenizer
        return self._tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(io.BytesIO(self.images[index])) as image:
            pixels = self.transform(image)
        return pixels, torch.tensor(self.tokenizer.encode(str(self.captions[index])).ids)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Our rule (mmcore/train/parallel.py) on open_clip's names: decay matrices but not position embeddings.

    open_clip keeps the CLS token as a vector where ours is (1, 1, D), which our rule decays: named here.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        matrix = param.ndim >= 2 and "positional_embedding" not in name
        (decay if matrix or name == "visual.class_embedding" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def forever(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


def train(cfg: RunConfig, loader_workers: int, out: Path) -> dict:
    """The training loop of open_clip's train_one_epoch, reduced to one process, fp32, no accumulation."""
    if cfg.task.loss != "clip":
        raise ValueError(f"task.loss {cfg.task.loss!r}: the open_clip side trains the clip loss only")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    version = DatasetVersion.open(cfg.data.dataset)
    tokenizer = Tokenizer.from_file(str(version.tokenizer_path))
    task, pre = build_task(cfg, model_config(cfg.model.name), version.tokenizer_path.read_text())
    model = openclip_model(cfg.model.name, task.model.cfg, tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD), out)
    ds = build_ds_config(cfg, "fp32")
    adamw, factor = ds["optimizer"]["params"], warmup_cosine(ds["scheduler"]["params"])
    optimizer = torch.optim.AdamW(param_groups(model, adamw["weight_decay"]), lr=adamw["lr"],
                                  betas=tuple(adamw["betas"]), eps=adamw["eps"])
    transform = open_clip.image_transform(pre.image_size, is_train=False, mean=pre.mean, std=pre.std)
    loader = torch.utils.data.DataLoader(
        ParquetPairs(version, transform, pre.context_length), batch_size=ds["train_batch_size"], shuffle=True,
        drop_last=True, num_workers=loader_workers, persistent_workers=loader_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed))
    loss_fn, max_scale = open_clip.loss.ClipLoss(), task.loss.max_scale
    steps, batches = cfg.optim.max_steps, forever(loader)
    losses, ends = [], []
    started = time.perf_counter()
    for step in range(steps):
        images, texts = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = adamw["lr"] * factor(step)
        features = model(images, texts)
        # ours clamps the scale at 100 in the loss; open_clip's main clamps log(scale) after the step instead
        scale = features["logit_scale"].clamp(max=max_scale)
        loss = loss_fn(features["image_features"], features["text_features"], scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
        optimizer.step()
        losses.append(loss.item())
        ends.append(time.perf_counter())
    steady = (steps - SKIPPED_STEPS) * ds["train_batch_size"] / (ends[-1] - ends[SKIPPED_STEPS - 1])
    return {"samples_per_second": steady, "skipped_steps": SKIPPED_STEPS, "loss": losses,
            "step_s": [end - start for start, end in zip([started] + ends[:-1], ends)],
            "loop_wall_s": ends[-1] - started, "params": {"open_clip": count(model), "ours": count(task)},
            "batch_size": ds["train_batch_size"], "steps": steps, "loader_workers": loader_workers,
            "torch_threads": threads, "torch": torch.__version__, "open_clip": open_clip.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--parity", action="store_true", help="loss and model parity with mmcore")
    mode.add_argument("--run-config", type=Path, help="a RunConfig as JSON (mmcore.config.to_dict): train it")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON result and model config")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.parity:
        name, result = "parity.json", parity(args.out)
    else:
        cfg = from_dict(RunConfig, json.loads(args.run_config.read_text()))
        if cfg.optim.max_steps <= SKIPPED_STEPS:
            raise SystemExit(f"optim.max_steps {cfg.optim.max_steps}: throughput needs more than {SKIPPED_STEPS} steps")
        name, result = "train.json", train(cfg, args.loader_workers, args.out)
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
