"""The language stage and imported checkpoints for real: DeepSpeed in this process, MLflow on sqlite, the
registered Hugging Face directory opened by plain transformers in a fresh process, evaluation and the pyfunc
by alias; tiny Llama- and GPT-2-style checkpoints built from configs and imported as a download would be."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _tokenizer(dataset, chat_template: bool):
    """The dataset's BPE as a transformers tokenizer, as a Hub checkpoint would bring one (with or without a
    chat template and padding token)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(dataset.tokenizer_path.read_text()),
                                        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        tokenizer.pad_token = "<pad>"
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tokenizer


def _checkpoint(directory, dataset, config, chat_template=True):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    _tokenizer(dataset, chat_template).save_pretrained(directory)
    return directory


def _versions(mmpipe_home, name="mmpipe-language") -> int:
    from mlflow.tracking import MlflowClient

    return len(MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}").search_model_versions(f"name='{name}'"))


def test_the_language_stage_learns_and_registers_a_model_plain_transformers_opens(language_model, train_dataset,
                                                                                  mmpipe_home, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from mmcore import registry
    from mmcore.eval.run import evaluate
    from mmcore.tracking import fluent_uri

    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    losses = [m.value for m in sorted(client.get_metric_history(language_model.mlflow_run_id, "loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    version = client.get_model_version_by_alias("mmpipe-language", "candidate")
    assert language_model.model_name == "mmpipe-language" and str(version.version) == language_model.model_version
    assert version.tags["stage"] == "language" and version.tags["dataset_id"] == language_model.dataset_id

    directory = registry.model_files("models:/mmpipe-language@candidate").directory
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(directory)!r})
tokenizer = AutoTokenizer.from_pretrained({str(directory)!r})
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "what colour is the circle?"}}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
print(json.dumps({{"class": type(model).__name__, "new": out.shape[1] - prompt["input_ids"].shape[1],
                   "mmcore": any(m.startswith("mmcore") for m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"class": "LlamaForCausalLM", "new": found["new"], "mmcore": False} and 1 <= found["new"] <= 4

    report = evaluate("models:/mmpipe-language@candidate", str(train_dataset.path))
    text = report.metrics["text"]
    assert report.ok and report.primaries["text"] == "answer_accuracy"
    # A random model of this vocabulary scores about 450; this one 32 alone and 54 after the whole suite before it
    # in one process (its 60 steps do not train identically then: noted, not understood yet).
    assert 1 < text["perplexity"] < 100, text
    assert 0 <= text["answer_accuracy"] <= 1 and 0 <= text["heldout_answer_accuracy"] <= 1
    assert {"colour_accuracy", "count_accuracy", "digit_accuracy"} <= set(text)

    with fluent_uri(f"sqlite:///{mmpipe_home / 'mlflow.db'}"):
        answers = mlflow.pyfunc.load_model("models:/mmpipe-language@candidate").predict(
            pd.DataFrame({"prompt": ["an image of a red circle\nwhat colour is the circle?", "describe a square."]}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_hugging_face_checkpoints_import_as_language_models_with_their_lineage(train_dataset, mmpipe_home, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from mmcore import registry
    from mmcore.hub import import_model
    from mmcore.storage import sha256
    from mmcore.tracking import resolve_uri
    from mmcore.config import TrackingConfig

    vocab = len(_tokenizer(train_dataset, True))
    llama = _checkpoint(tmp_path / "tiny-llama", train_dataset, LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=2, eos_token_id=3))
    gpt2 = _checkpoint(tmp_path / "tiny-gpt2", train_dataset, GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=2, eos_token_id=3),
        chat_template=False)
    uri = resolve_uri(TrackingConfig())
    for directory, architecture in ((llama, "LlamaForCausalLM"), (gpt2, "GPT2LMHeadModel")):
        imported = import_model(str(directory), "language", alias="imported")
        name, number = registry.resolve_version("models:/mmpipe-language@imported", uri)
        assert imported == f"models:/{name}/{number}"
        tags = registry.version_tags(name, number, uri)
        assert tags["source"] == str(directory) and tags["source_revision"] == "local"
        assert tags["sha256.model.safetensors"] == sha256(directory / "model.safetensors")
        chain = registry.lineage(imported, uri)
        assert [link["kind"] for link in chain] == ["model", "checkpoint"] and chain[1]["name"] == str(directory)
        model, _ = registry.load_model(imported, uri)
        assert type(model.lm).__name__ == architecture
        assert all(isinstance(a, str) for a in model.complete(["a red circle\nwhat colour?"], max_new_tokens=3))
    # The GPT-2 checkpoint brought no padding token and no chat template: both were given, and saved.
    directory = registry.model_files("models:/mmpipe-language@imported", uri).directory
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<eos>" and "Assistant:" in (directory / "chat_template.jinja").read_text()


def test_bad_checkpoints_are_refused_with_nothing_registered(train_dataset, mmpipe_home, tmp_path):
    from transformers import CLIPConfig, LlamaConfig

    from mmcore.hub import import_model

    before = _versions(mmpipe_home)
    tiny = dict(vocab_size=len(_tokenizer(train_dataset, True)), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    pickled = _checkpoint(tmp_path / "pickled", train_dataset, LlamaConfig(**tiny))
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: pickled weights are not loaded"):
        import_model(str(pickled), "language")
    unknown = _checkpoint(tmp_path / "unknown", train_dataset, LlamaConfig(**tiny))
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match="transformers cannot read its config.json"):
        import_model(str(unknown), "language")
    clip = tmp_path / "clip"
    from transformers import CLIPModel

    CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "vocab_size": 99},
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         projection_dim=16)).save_pretrained(clip)
    _tokenizer(train_dataset, True).save_pretrained(clip)
    with pytest.raises(ValueError, match="not a causal language model"):
        import_model(str(clip), "language")
    with pytest.raises(ValueError, match="without a network, import a local directory"):
        import_model("someone/some-model", "language")
    assert _versions(mmpipe_home) == before


def test_llavas_two_phases_on_a_language_parent(language_model, trained, train_dataset, train_chats, mmpipe_home):
    """Alignment: the language parent frozen (bit-identical after), on the caption dataset (caption requests);
    instruction: on the corpus's conversations, from the aligned model, LoRA on the LM, registered as adapters naming the parent (the bundle holds none of its
    weights; loaded by the registry and the pyfunc on that base, the adapters learned). Both parents and the
    start recorded, the parent's tokenizer kept. The merged registration: the ZeRO-3 LoRA test."""
    import mlflow
    import pandas as pd
    from safetensors.torch import load_file

    from mmcore import registry
    from mmcore.cli import apply_overrides
    from mmcore.eval.run import evaluate
    from mmcore.models.encode import generate_answers
    from mmcore.recipes import recipe
    from mmcore.tracking import fluent_uri
    from mmcore.train.fit import fit
    from tests.integration.workers import HERE

    wrong = apply_overrides(recipe("debug-fusion", str(train_dataset.path)), [
        f"model.parent={json.dumps(trained.model_uri)}", f"model.lm_parent={json.dumps(trained.model_uri)}", *HERE])
    with pytest.raises(ValueError, match=r"model.lm_parent: .* is a clip model, not a language one"):
        fit(wrong)
    fused = fit(apply_overrides(recipe("debug-fusion", str(train_dataset.path)), [
        f"model.parent={json.dumps(trained.model_uri)}", f"model.lm_parent={json.dumps(language_model.model_uri)}",
        "model.freeze_lm=true", "optim.max_steps=30", "checkpoint.every_steps=15",
        "optim.lr=0.003", 'tracking.alias="aligned-test"', *HERE]))
    tags = registry.version_tags(fused.model_name, fused.model_version, f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    assert tags["lm_parent_model"] == language_model.model_uri.removeprefix("models:/")
    assert tags["parent_model"] == trained.model_uri.removeprefix("models:/")
    model, preprocess = registry.load_model(fused.model_uri)
    parent, parent_preprocess = registry.load_model(language_model.model_uri)
    ours, theirs = model.lm.hf.state_dict(), parent.lm.state_dict()
    assert ours.keys() == theirs.keys() and all(torch_equal(ours[k], theirs[k]) for k in ours)  # frozen: bit-identical
    assert type(model.lm.hf).__name__ == "LlamaForCausalLM"
    assert json.loads(preprocess.tokenizer_json)["added_tokens"] == json.loads(
        parent_preprocess.tokenizer_json)["added_tokens"]  # the parent's tokenizer travelled with its LM
    assert fused.metrics["bad_steps"] == 0
    tree = [(link["depth"], link["kind"], link["name"]) for link in
            registry.lineage(fused.model_uri, f"sqlite:///{mmpipe_home / 'mlflow.db'}")]
    assert tree == [(0, "model", fused.model_uri),
                    (1, "model", trained.model_uri), (2, "dataset", train_dataset.id),
                    (3, "url list", train_dataset.manifest["source"]["path"]),
                    (1, "model", language_model.model_uri), (2, "dataset", train_dataset.id),
                    (3, "url list", train_dataset.manifest["source"]["path"])]

    instructed = fit(apply_overrides(recipe("debug-fusion", str(train_chats.path)), [
        f"model.parent={json.dumps(trained.model_uri)}", f"model.lm_parent={json.dumps(language_model.model_uri)}",
        'model.start_from="models:/mmpipe-fusion@aligned-test"', "model.lora.rank=4", "model.lora.merge=false",
        "optim.max_steps=20", "checkpoint.every_steps=10", 'tracking.alias="instructed-test"', *HERE]))
    tags = registry.version_tags(instructed.model_name, instructed.model_version,
                                 f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    assert tags["start_model"] == fused.model_uri.removeprefix("models:/")
    files = registry.model_files(instructed.model_uri)
    stored = load_file(files.weights)
    assert json.loads(Path(files.config).read_text())["adapters"]["base"] == language_model.model_uri
    assert any("lora_B" in k for k in stored) and not [k for k in stored if k.startswith("lm.") and "lora_" not in k]
    assert Path(files.weights).stat().st_size < Path(registry.model_files(fused.model_uri).weights).stat().st_size
    model, own = registry.load_model(instructed.model_uri)  # its base fetched from the registry
    probe = train_dataset.read("test", columns=["image"]).column("image").to_pylist()[:2]
    native = generate_answers(model, own, probe, ["describe the image.", "what colour is it?"], 8)
    model.merge_adapters()
    tuned = model.lm.hf.state_dict()
    assert tuned.keys() == theirs.keys()
    assert not all(torch_equal(tuned[k], theirs[k]) for k in tuned)  # the adapters learned in this phase
    with fluent_uri(f"sqlite:///{mmpipe_home / 'mlflow.db'}"):
        answers = mlflow.pyfunc.load_model("models:/mmpipe-fusion@instructed-test").predict(
            pd.DataFrame({"image": probe, "prompt": ["describe the image.", "what colour is it?"]}),
            params={"max_new_tokens": 8})
    assert list(answers) == native
    report = evaluate(instructed.model_uri, str(train_dataset.path), suites=["vqa"])
    assert report.ok and 0 <= report.metrics["vqa"]["accuracy"] <= 1


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
