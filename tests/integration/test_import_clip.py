"""CLIP and SigLIP checkpoints imported into the contrastive stage for real: tiny ones built from configs and saved
as a download would be, registered in MLflow on sqlite, evaluated by the stage's suites, answering through the
pyfunc by alias, and fine-tuned with the image tower locked (LiT) through the same fit() as any run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.integration

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 32}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def _tokenizer(dataset):
    """The dataset's BPE as a transformers tokenizer, as a Hub checkpoint brings one (here without padding)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(dataset.tokenizer_path.read_text()),
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _checkpoint(directory, dataset, architecture: str, image_size: int = 32, processor: bool = True):
    """A tiny CLIP or SigLIP with random weights, saved with save_pretrained (and an image processor's file)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipModel

    tokenizer = _tokenizer(dataset)
    text, vision = {**TEXT, "vocab_size": len(tokenizer)}, {**VISION, "image_size": image_size}
    torch.manual_seed(0)
    if architecture == "clip":  # CLIP pools the text at its first <eos>
        model = CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": tokenizer.eos_token_id},
                                     vision_config=vision, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if processor:
        CLIPImageProcessor(image_mean=[0.4, 0.45, 0.5], image_std=[0.25, 0.25, 0.3]).save_pretrained(directory)
    return directory


def _versions(mmpipe_home, name="mmpipe-contrastive") -> int:
    from mlflow.tracking import MlflowClient

    return len(MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}").search_model_versions(f"name='{name}'"))


@pytest.fixture(scope="module")
def imported_clip(train_dataset, mmpipe_home, tmp_path_factory):
    """A tiny CLIP checkpoint imported as models:/mmpipe-contrastive@imported-clip: (directory, models:/ URI)."""
    from mmcore.hub import import_model

    directory = _checkpoint(tmp_path_factory.mktemp("hub") / "tiny-clip", train_dataset, "clip")
    return directory, import_model(str(directory), "contrastive", alias="imported-clip")


def test_clip_and_siglip_import_embed_as_transformers_does_and_are_evaluated(imported_clip, train_dataset,
                                                                            mmpipe_home, tmp_path):
    import mlflow.pyfunc
    from transformers import AutoModel

    from mmcore import registry
    from mmcore.config import TrackingConfig
    from mmcore.eval.run import evaluate
    from mmcore.hub import import_model
    from mmcore.storage import sha256
    from mmcore.tracking import fluent_uri, resolve_uri

    uri = resolve_uri(TrackingConfig())
    siglip = _checkpoint(tmp_path / "tiny-siglip", train_dataset, "siglip", processor=False)
    checkpoints = {"clip": imported_clip, "siglip": (siglip, import_model(str(siglip), "contrastive",
                                                                          alias="imported-siglip"))}
    rows = train_dataset.read("test", ["image", "caption"]).slice(0, 4).to_pylist()
    for architecture, (directory, imported) in checkpoints.items():
        tags = registry.version_tags(*imported.removeprefix("models:/").split("/"), uri)
        assert tags["source"] == str(directory) and tags["sha256.model.safetensors"] == sha256(
            directory / "model.safetensors")
        chain = registry.lineage(imported, uri)
        assert [link["kind"] for link in chain] == ["model", "checkpoint"]
        model, preprocess = registry.load_model(imported, uri)
        # The normalisation is the checkpoint's image processor's (SigLIP's own without one); the captions
        # are padded to the text model's positions with the tokenizer's <eos> (it named no padding token).
        expected_mean = [0.4, 0.45, 0.5] if architecture == "clip" else [0.5, 0.5, 0.5]
        assert preprocess.cfg.mean == pytest.approx(expected_mean) and preprocess.cfg.image_size == 32
        tokens = torch.from_numpy(preprocess.tokens([r["caption"] for r in rows]))
        assert tokens.shape == (4, 32) and int(tokens[0, -1]) == _tokenizer(train_dataset).eos_token_id
        # Our embeddings are plain transformers' on the same inputs: one model, not a re-implementation.
        plain = AutoModel.from_pretrained(directory).eval()
        pixels = torch.from_numpy(preprocess.images([r["image"] for r in rows]))
        with torch.no_grad():
            ours = model(pixels, tokens)
            theirs = plain.get_image_features(pixel_values=pixels).pooler_output
            theirs_text = plain.get_text_features(input_ids=tokens).pooler_output
        assert torch.allclose(ours["image_features"], torch.nn.functional.normalize(theirs, dim=-1), atol=1e-5)
        assert torch.allclose(ours["text_features"], torch.nn.functional.normalize(theirs_text, dim=-1), atol=1e-5)
        with fluent_uri(uri):
            pyfunc = mlflow.pyfunc.load_model(f"models:/mmpipe-contrastive@imported-{architecture}")
        embedded = pyfunc.predict(pd.DataFrame({"text": [rows[0]["caption"]]}))
        assert np.allclose(np.asarray(embedded)[0], ours["text_features"][0].numpy(), atol=1e-5)
    report = evaluate(checkpoints["siglip"][1], str(train_dataset.path), suites=["retrieval"])
    assert report.ok and 0 <= report.metric("retrieval.image_to_text_recall_5") <= 1


def test_lit_fine_tunes_the_text_side_of_an_imported_clip(imported_clip, train_dataset, mmpipe_home):
    from mmcore import registry
    from mmcore.bundle import ModelBundle
    from mmcore.cli import apply_overrides
    from mmcore.config import TrackingConfig
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from mmcore.tracking import resolve_uri
    from tests.integration.workers import HERE

    directory, imported = imported_clip
    cfg = apply_overrides(recipe("finetune", str(train_dataset.path)), [
        f'model.parent="{imported}"', "model.freeze_vision=true", "optim.max_steps=12", "optim.lr=0.003",
        "optim.warmup_steps=2", "checkpoint.every_steps=6", "data.batch_size=32", "data.val_batches=1",
        'tracking.model_name="mmpipe-lit-test"', 'tracking.alias="lit"', *HERE])
    result = fit(cfg)
    uri = resolve_uri(TrackingConfig())
    parent, _ = registry.load_model(imported, uri)
    tuned, _ = registry.load_model("models:/mmpipe-lit-test@lit", uri)
    start, end = parent.state_dict(), tuned.state_dict()
    tower = [k for k in start if k.startswith(("hf.vision_model.", "hf.visual_projection."))]
    text = [k for k in start if k.startswith(("hf.text_model.", "hf.text_projection."))]
    assert tower and all(torch.equal(start[k], end[k]) for k in tower), "LiT keeps the image tower as it was"
    assert any(not torch.equal(start[k], end[k]) for k in text), "the text side learned"
    assert result.metrics["step"] == 12 and np.isfinite(result.metrics["loss"])
    # The fine-tuned model is still the checkpoint's kind, with its tokenizer and normalisation, and names it.
    bundle = ModelBundle.at(registry.model_files("models:/mmpipe-lit-test@lit", uri).directory)
    card = json.loads(open(bundle.config).read())
    assert card["family"] == "hf-clip" and card["architecture"] == "clip"
    assert json.loads(bundle.tokenizer_json())["model"] == json.loads(
        (directory / "tokenizer.json").read_text())["model"]
    tree = [(link["depth"], link["kind"], link["name"])
            for link in registry.lineage("models:/mmpipe-lit-test@lit", uri)]
    assert tree == [(0, "model", result.model_uri), (1, "dataset", train_dataset.id),
                    (2, "url list", train_dataset.manifest["source"]["path"]),
                    (1, "model", imported), (2, "checkpoint", str(directory))]


def test_bad_contrastive_checkpoints_are_refused_with_nothing_registered(imported_clip, train_dataset, mmpipe_home,
                                                                         tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmcore.cli import apply_overrides
    from mmcore.hub import import_model
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from tests.integration.workers import HERE

    before = _versions(mmpipe_home)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(_tokenizer(train_dataset)), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(llama)
    _tokenizer(train_dataset).save_pretrained(llama)
    with pytest.raises(ValueError, match="a llama checkpoint; the contrastive stage imports CLIP and SigLIP"):
        import_model(str(llama), "contrastive")
    # A CLIP that takes larger images than the dataset stores (64 pixels) is imported, but not trained on it.
    large = import_model(str(_checkpoint(tmp_path / "large", train_dataset, "clip", image_size=96)), "contrastive",
                         alias="too-large")
    assert _versions(mmpipe_home) == before + 1
    runs = mmpipe_home / "runs"
    made = set(runs.glob("*"))
    cfg = apply_overrides(recipe("finetune", str(train_dataset.path)), [f'model.parent="{large}"', *HERE])
    with pytest.raises(ValueError, match="takes 96-pixel images but dataset .* stores 64-pixel ones"):
        fit(cfg)
    assert set(runs.glob("*")) == made, "no run directory is left behind"


def test_llava_on_an_imported_clip_sees_through_its_tower_unchanged(imported_clip, train_dataset, mmpipe_home,
                                                                    tmp_path):
    from mmcore import registry
    from mmcore.cli import apply_overrides
    from mmcore.config import TrackingConfig
    from mmcore.eval.run import evaluate
    from mmcore.models.pretrained_clip import PretrainedClip, PretrainedClipConfig, PretrainedVisionTower
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from mmcore.tracking import resolve_uri
    from tests.integration.workers import HERE

    directory, imported = imported_clip
    fused = fit(apply_overrides(recipe("debug-fusion", str(train_dataset.path)), [
        f'model.parent="{imported}"', "optim.max_steps=10", "checkpoint.every_steps=5", "data.val_batches=1",
        'tracking.model_name="mmpipe-fusion-on-clip"', 'tracking.alias="on-clip"', *HERE]))
    uri = resolve_uri(TrackingConfig())
    parent, _ = registry.load_model(imported, uri)
    model, preprocess = registry.load_model(fused.model_uri, uri)
    ours, theirs = model.visual.state_dict(), parent.vision_state()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), "the tower is frozen"
    assert preprocess.cfg.mean == pytest.approx([0.4, 0.45, 0.5]), "images normalised as the parent's were"
    assert evaluate(fused.model_uri, str(train_dataset.path), suites=["vqa"]).ok
    # SigLIP has no CLS token: its attention-pooled output stands first, then the patches.
    siglip = PretrainedClip.from_pretrained(_checkpoint(tmp_path / "siglip", train_dataset, "siglip"),
                                            PretrainedClipConfig(architecture="siglip"))
    tower = PretrainedVisionTower(PretrainedClipConfig(architecture="siglip", hf={
        k: v for k, v in siglip.hf.config.to_dict().items() if k != "model_type"}))
    tower.load_state_dict(siglip.vision_state())
    images = torch.randn(2, 3, 32, 32)
    tokens = tower(images).detach()
    assert tokens.shape == (2, 1 + 16, 32)
    assert torch.allclose(tokens[:, 0], siglip.hf.get_image_features(pixel_values=images).pooler_output, atol=1e-5)


CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The chat template of SmolLM2 and Qwen2 instruct models (ChatML)."""


def _chatml_lm(directory, dataset):
    """A tiny Llama with a byte-level BPE of its own (not the dataset's), ChatML and no <image>, as an instruct
    model from the Hub has: its embedding table exactly as large as its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = dataset.read("train", ["caption"]).column("caption").to_pylist()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0,
                                 bos_token_id=None)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, len(tokenizer)


def test_llava_on_an_imported_clip_and_an_imported_lm_speaks_the_lms_chat_template(imported_clip, train_dataset,
                                                                                   mmpipe_home, tmp_path):
    from tokenizers import Tokenizer

    from mmcore import registry
    from mmcore.cli import apply_overrides
    from mmcore.config import TrackingConfig
    from mmcore.data.instruct import ChatFormat, TemplateChat
    from mmcore.eval.run import evaluate
    from mmcore.hub import import_model
    from mmcore.models.generate import IGNORE
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit
    from mmcore.tracking import resolve_uri
    from tests.integration.workers import HERE

    directory, vocab = _chatml_lm(tmp_path / "tiny-chatml", train_dataset)
    lm = import_model(str(directory), "language", alias="chatml")
    overrides = [f'model.parent="{imported_clip[1]}"', f'model.lm_parent="{lm}"', "model.freeze_lm=true",
                 "optim.max_steps=10", "checkpoint.every_steps=5", "data.val_batches=1",
                 'tracking.model_name="mmpipe-fusion-imported"', 'tracking.alias="imported"', *HERE]
    runs = mmpipe_home / "runs"
    made = set(runs.glob("*"))
    with pytest.raises(ValueError, match="data.pack_length: questions are packed in mmpipe's chat format only"):
        fit(apply_overrides(recipe("debug-fusion", str(train_dataset.path)), overrides))  # it packs by default
    assert set(runs.glob("*")) == made, "refused before a run directory was made"
    fused = fit(apply_overrides(recipe("debug-fusion", str(train_dataset.path)), [*overrides, "data.pack_length=0"]))

    uri = resolve_uri(TrackingConfig())
    model, preprocess = registry.load_model(fused.model_uri, uri)
    parent, _ = registry.load_model(lm, uri)
    tokenizer = Tokenizer.from_str(preprocess.tokenizer_json)
    assert tokenizer.token_to_id("<image>") == vocab and model.image_id == vocab, "<image> added after its vocabulary"
    ours, theirs = model.lm.hf.get_input_embeddings().weight, parent.lm.get_input_embeddings().weight
    assert ours.shape[0] == vocab + 1 and torch.equal(ours[:vocab], theirs), "the frozen LM is the parent's"
    assert torch.allclose(ours[vocab], theirs.mean(0)), "the new row starts at the mean of the others"
    chat = ChatFormat.of(preprocess)
    assert isinstance(chat, TemplateChat) and model.eos_id == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.decode(chat.prompt("what colour is the circle?"), skip_special_tokens=False) == (
        "<|im_start|>user\n<image>\nwhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n")
    ids, labels, _ = chat.encode("what colour is the circle?", "red")
    assert tokenizer.decode([t for t in labels if t != IGNORE], skip_special_tokens=False) == "red<|im_end|>\n"
    assert evaluate(fused.model_uri, str(train_dataset.path), suites=["vqa"]).ok


@pytest.mark.fault
def test_lora_on_an_imported_lm_under_zero3_on_ray_survives_a_killed_worker(imported_clip, train_dataset, local_ray,
                                                                           mmpipe_home, tmp_path, fault):
    """Ray Train, 2 workers, ZeRO-3: the LM's table grown by <image>, LoRA adapters on the frozen LM, the tower
    frozen, one worker killed after the step-10 checkpoint; the registered model has the adapters merged."""
    from mmcore import registry
    from mmcore.cli import apply_overrides
    from mmcore.config import TrackingConfig
    from mmcore.hub import import_model
    from mmcore.recipes import recipe
    from mmcore.tracking import resolve_uri
    from tests.integration.workers import fit_killing_a_worker

    directory, vocab = _chatml_lm(tmp_path / "tiny-chatml", train_dataset)
    lm = import_model(str(directory), "language", alias="chatml-zero3")
    runs = tmp_path / "runs"
    cfg = apply_overrides(recipe("debug-fusion", str(train_dataset.path)), [
        f'model.parent="{imported_clip[1]}"', f'model.lm_parent="{lm}"', "model.lora.rank=4", "data.pack_length=0",
        "parallel.zero_stage=3", "optim.max_steps=30", "checkpoint.every_steps=10", "checkpoint.max_failures=1",
        f'cluster.storage_path="{runs}"', 'tracking.model_name="mmpipe-lora-zero3"', 'tracking.alias="lora-zero3"'])
    result, killed_at = fit_killing_a_worker(cfg, runs, "*/checkpoints/step-00000010")
    assert result.metrics["step"] == 30 and result.metrics["resumed_from"] >= 10
    uri = resolve_uri(TrackingConfig())
    model, _ = registry.load_model(result.model_uri, uri)
    parent_lm, _ = registry.load_model(lm, uri)
    clip, _ = registry.load_model(imported_clip[1], uri)
    ours, theirs = model.lm.hf.state_dict(), parent_lm.lm.state_dict()
    assert ours["model.embed_tokens.weight"].shape[0] == vocab + 1, "the table grown by <image> under ZeRO-3"
    adapted = [k for k in theirs if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert adapted and all(not torch.equal(ours[k], theirs[k]) for k in adapted), "the adapters were merged in"
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], theirs["model.layers.0.mlp.up_proj.weight"])
    tower, start = model.visual.state_dict(), clip.vision_state()
    assert all(torch.equal(tower[k], start[k]) for k in start), "the frozen tower is the parent's under ZeRO-3"
    fault("worker-killed", "SIGKILL to a Ray Train worker after the step-10 checkpoint (fusion with LoRA on an "
          "imported LM, ZeRO-3)", 1, f"killed at step {killed_at}, resumed from step {result.metrics['resumed_from']}")
