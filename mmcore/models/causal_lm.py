"""A decoder language model from transformers: the language stage's model, one code path for the LMs mmpipe
trains (a transformers architecture built from a config at demo sizes) and those imported from a Hugging
Face checkpoint.

On disk it is a Hugging Face directory (config.json, model.safetensors, the tokenizer with its chat template)
that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open without mmpipe.
transformers is imported when a model is built or loaded, not with this module: the CLI stays quick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmcore.models.preprocess import PreprocessConfig

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
                 "{% else %}<|assistant|>{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""The chat format of the LMs mmpipe trains: `<bos> <|user|> question <|assistant|> answer <eos>` per turn
after one <bos> (the fusion stage's, with the <image> in the user's text). An imported LM brings its own."""


@dataclass
class CausalLMConfig:
    """A transformers causal LM at a given size (`architecture` is its model_type: llama, gpt2, qwen2, ...)."""

    architecture: str = "llama"
    context_length: int = 128
    """Tokens per training sequence of the language stage."""
    positions: int = 0
    """The positions the model has (0: context_length); a fusion model puts an image's tokens and a
    question in them."""
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vocab_size: int = 0
    """Set from the stage's tokenizer when built."""
    extra: dict = field(default_factory=dict)
    """Further fields of the architecture's transformers config, verbatim (e.g. {"n_inner": 512} for gpt2)."""
    chat_template: str = ""
    """An imported LM's own chat template (Jinja), which a fusion model on it speaks; empty: mmpipe's."""
    chat_tokens: dict = field(default_factory=dict)
    """The special tokens its template names, by role (bos_token, eos_token, pad_token)."""

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 8:
            raise ValueError(f"context_length {self.context_length} is below 8")
        if self.positions and self.positions < self.context_length:
            raise ValueError(f"positions {self.positions} is below context_length {self.context_length}")

    def set_vocab_size(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=0, context_length=self.context_length)

    def hf_config(self, special_ids: dict[str, int]):
        """The transformers config; `special_ids`: bos_token_id, eos_token_id, pad_token_id."""
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(self.architecture, **{
                "vocab_size": self.vocab_size, "hidden_size": self.width, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "intermediate_size": int(self.width * self.mlp_ratio),
                "max_position_embeddings": self.positions or self.context_length, "tie_word_embeddings": False,
                **special_ids, **self.extra})
        except ValueError as err:
            raise ValueError(f"architecture: transformers does not know {self.architecture!r} ({err})") from None


def _from_config(cfg: CausalLMConfig, eos_id: int) -> nn.Module:
    """A freshly initialised transformers LM, with the ids of the dataset tokenizer's specials."""
    from transformers import AutoModelForCausalLM

    from mmcore.data.tokenizer import BOS, PAD, SPECIAL_TOKENS

    quiet()
    config = cfg.hf_config({"bos_token_id": SPECIAL_TOKENS.index(BOS), "eos_token_id": eos_id,
                            "pad_token_id": SPECIAL_TOKENS.index(PAD)})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class PretrainedDecoder(nn.Module):
    """A transformers causal LM behind the interface the fusion families use (models/decoder.py DecoderLM):
    embeddings in (B, N, D) at positions start..start+N-1, or a packing's -> final hidden states (B, N, D);
    `head` reads logits out; `new_caches` is a transformers cache for generation. Its weights come from a
    language parent (tasks.FusionTask)."""

    def __init__(self, cfg: CausalLMConfig, eos_id: int):
        super().__init__()
        self.cfg = cfg
        self.hf = _from_config(cfg, eos_id)
        """The transformers model; while LoRA trains, peft's wrapper around it (`with_lora`)."""
        self.parent_rows: int | None = None
        """The language parent's vocabulary size, once load_parent has loaded it."""
        self.new_rows: nn.Embedding | None = None
        """While the table is frozen, the rows its parent lacks, training apart (`train_new_rows`)."""

    @property
    def core(self) -> nn.Module:
        """The transformers model itself (inside peft's wrapper while LoRA trains)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    @property
    def max_positions(self) -> int:
        return int(self.core.config.max_position_embeddings)

    @property
    def head(self) -> nn.Module:
        return self.core.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.core.get_input_embeddings()(input_ids)
        if self.new_rows is None:
            return x
        new = input_ids - self.parent_rows
        return torch.where((new >= 0)[..., None], self.new_rows(new.clamp(min=0)).to(x.dtype), x)

    def linear_layers(self) -> list[str]:
        """The names the LM's linear layers end with (what LoRA's target_modules name)."""
        return sorted({name.rsplit(".", 1)[-1] for name, module in self.core.named_modules()
                       if isinstance(module, nn.Linear)})

    def load_parent(self, lm: nn.Module) -> None:
        """The language parent's transformers weights; the rows of tokens its vocabulary lacks (the <image> the
        fusion stage adds to an imported LM's tokenizer) start at the mean of its rows, as LLaVA and Emu3 do."""
        self.core.load_state_dict(self._parent_state(lm))
        self.parent_rows = lm.get_input_embeddings().num_embeddings

    def holds_parent(self, lm: nn.Module) -> bool:
        """Whether this LM's weights are still the parent's (the rows the parent lacks aside)."""
        ours = self.core.state_dict()
        return all(torch.equal(ours[key] if ours[key].shape == value.shape else ours[key][: len(value)], value)
                   for key, value in lm.state_dict().items())

    def train_new_rows(self) -> None:
        """With the LM's own weights frozen (model.freeze_lm, LoRA), the input rows of the tokens its parent
        lacked (<image> on an imported LM, a unified model's codes) still train, in a table of their own that
        `merge_adapters` writes back, as open_flamingo trains its media token's row. None to add: nothing."""
        table = self.core.get_input_embeddings().weight
        if self.parent_rows is not None and self.parent_rows < len(table):
            self.new_rows = nn.Embedding.from_pretrained(table[self.parent_rows:].detach().clone(), freeze=False)

    def _parent_state(self, lm: nn.Module) -> dict[str, torch.Tensor]:
        ours, state = self.core.state_dict(), {}
        for key, value in lm.state_dict().items():
            if key in ours and value.shape != ours[key].shape and value.shape[1:] == ours[key].shape[1:]:
                grown = value.new_empty(ours[key].shape)
                grown[: len(value)], grown[len(value):] = value, value.mean(0)
                value = grown
            state[key] = value
        return state

    def with_lora(self, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
        """LoRA adapters (peft) on the `targets` linear layers; the LM's own weights frozen."""
        from peft import LoraConfig, get_peft_model

        missing = sorted(set(targets) - set(self.linear_layers()))
        if missing:
            raise ValueError(f"model.lora.target_modules: the language model has no {', '.join(missing)}; its linear "
                             f"layers: {', '.join(self.linear_layers())}")
        self.hf = get_peft_model(self.hf, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                     target_modules=list(targets)))

    def merge_adapters(self) -> None:
        """LoRA's adapters and the new rows merged into the weights: the plain transformers model again (what
        is registered)."""
        if hasattr(self.hf, "merge_and_unload"):
            self.hf = self.hf.merge_and_unload()
        if self.new_rows is not None:
            with torch.no_grad():
                self.core.get_input_embeddings().weight[self.parent_rows:] = self.new_rows.weight
            self.new_rows = None

    def decoder_layers(self) -> nn.ModuleList:
        """The LM's decoder layers (Llama's model.layers, GPT-2's transformer.h, ...)."""
        count = self.core.config.get_text_config().num_hidden_layers
        return next(m for m in self.core.base_model.modules() if isinstance(m, nn.ModuleList) and len(m) == count)

    def forward(self, x: torch.Tensor, start: int = 0, caches=None, between=None, packing=None) -> torch.Tensor:
        """`between(i, hidden)` runs before decoder layer i (Flamingo's cross-attention), through a pre-hook on
        the layer for this call, as open_flamingo wraps a pretrained LM's layers."""
        hooks = [] if between is None else [layer.register_forward_pre_hook(_before(i, between), with_kwargs=True)
                                            for i, layer in enumerate(self.decoder_layers())]
        try:
            return self._run(x, start, caches, packing)
        finally:
            for hook in hooks:
                hook.remove()

    def _run(self, x: torch.Tensor, start: int, caches, packing) -> torch.Tensor:
        if packing is None and start + x.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {start + x.shape[1]} positions is longer than the language model's "
                             f"{self.max_positions}")
        if packing is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device).expand(x.shape[0], -1)
            mask = None
        else:
            positions, mask = packing.positions, packing.mask()
        out = self.core.base_model(inputs_embeds=x, position_ids=positions, attention_mask=mask,
                                   past_key_values=caches, use_cache=caches is not None)
        return out.last_hidden_state

    def new_caches(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.core.config)


def decoder_lm(cfg, language: CausalLMConfig | None, eos_id: int, needed: int, sample: str) -> nn.Module:
    """The LM of a model whose samples take `needed` positions (`sample` says of what): a DecoderLM of
    `cfg` (a models.decoder.DecoderConfig) trained from scratch, or the language parent's (`language`), which
    must have that many positions."""
    if language is None:
        from mmcore.models.decoder import DecoderLM

        return DecoderLM(cfg, max_positions=needed)
    lm = PretrainedDecoder(language, eos_id)
    if lm.max_positions < needed:
        raise ValueError(f"the language model has {lm.max_positions} positions, fewer than the {sample} need")
    return lm


def _before(i: int, between):
    """A forward pre-hook that passes a decoder layer's input hidden states through between(i, .)."""
    def hook(module, args, kwargs):
        if args:
            return (between(i, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": between(i, kwargs["hidden_states"])}

    return hook


class CausalLM(nn.Module):
    """A transformers causal LM (`lm`) and, once saved or loaded, its tokenizer (`tokenizer`, with a chat
    template). forward(input_ids) -> logits; `complete` answers user messages; `text_nll` scores texts."""

    def __init__(self, cfg: CausalLMConfig, eos_id: int, lm: nn.Module | None = None, tokenizer=None):
        super().__init__()
        cfg.validate()
        self.cfg, self.eos_id, self.tokenizer = cfg, eos_id, tokenizer
        self.lm = lm if lm is not None else _from_config(cfg, eos_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def save_pretrained(self, directory: Path, tokenizer_json: str) -> None:
        """The Hugging Face directory: weights in fp32 safetensors, config, tokenizer and chat template."""
        save_fp32(self.lm, directory)
        (self.tokenizer or hf_tokenizer(tokenizer_json, self.cfg.context_length)).save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: Path, cfg: CausalLMConfig) -> "CausalLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        return cls(cfg, tokenizer.eos_token_id, lm, tokenizer)

    def _chat_prompts(self, messages: list[str | list[dict]]) -> list[list[int]]:
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": m}] if isinstance(m, str) else m,
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"] for m in messages]

    @torch.no_grad()
    def complete(self, messages: list[str | list[dict]], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
        """The greedy answer to each user message (or each conversation: chat messages ending with the user's),
        in the tokenizer's chat format."""
        prompts, out = self._chat_prompts(messages), []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            new = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=self.eos_id, pad_token_id=pad)[:, width:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [text.strip() for text in out]

    @torch.no_grad()
    def text_nll(self, texts: list[str], batch_size: int = 64) -> list[tuple[float, int]]:
        """(summed negative log-likelihood, tokens predicted) of each text, tokenized with its special tokens."""
        out = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(texts[start: start + batch_size], padding=True, return_tensors="pt",
                                     truncation=True, max_length=self.lm.config.max_position_embeddings)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            logits = self(ids, mask)[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            counted = mask[:, 1:].float()
            out += [(float(n), int(c)) for n, c in zip((nll * counted).sum(1), counted.sum(1))]
        return out


def hf_tokenizer(tokenizer_json: str, context_length: int):
    """The stage's tokenizer (the dataset's BPE with the chat roles) as a transformers tokenizer with its
    special tokens named and mmpipe's chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mmcore.data.tokenizer import BOS, CHAT_TOKENS, EOS, IMAGE, PAD, UNK

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token=BOS,
                                        eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                        extra_special_tokens={"image_token": IMAGE},
                                        model_max_length=context_length)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})  # already in the vocabulary
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_fp32(hf: nn.Module, directory: Path) -> None:
    """A transformers model's save_pretrained with its weights in fp32, whatever it trained in (its config says so)."""
    quiet()
    state = {k: v.detach().float().cpu().contiguous() for k, v in hf.state_dict().items()}
    hf.config.dtype = torch.float32
    hf.save_pretrained(directory, state_dict=state)


def quiet() -> None:
    """No progress bars of transformers' own on the user's console (mmpipe draws its own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def card(cfg: CausalLMConfig) -> dict:
    """The model.json of a causal LM."""
    return {"family": "lm", **asdict(cfg)}
