"""The unified model (Chameleon-style early fusion): one decoder-only transformer over one vocabulary,
the text tokens and then the image tokenizer's codes, each a named token of its tokenizer (offset = the id of
code 0).

An image is `<|image_start|> code ... code <|image_end|>` in the sequence, its codes made by the
registered image tokenizer (a frozen part of this model, so it can read images and draw them).
Reading: `generate(images, prompt_ids)` and `score` come from models/generate.py (the image's code
embeddings stand where the prompt's `<image>` token is), so the fusion stage's suites run unchanged.
Drawing: `generate_image(prompt_ids)` samples codes only (text ids are masked inside the image span)
and decodes them to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmcore.models.causal_lm import CausalLMConfig, decoder_lm
from mmcore.models.decoder import DecoderConfig, Packing
from mmcore.models.generate import IGNORE, TextGenerator, splice_hidden
from mmcore.models.imagetok import ImageTokenizer, ImageTokenizerConfig
from mmcore.models.preprocess import PreprocessConfig
from mmcore.models.sampling import sample
from mmcore.models.transformer import KVCache


@dataclass
class UnifiedConfig:
    lm: DecoderConfig = field(default_factory=lambda: DecoderConfig(qk_norm=True))
    """context_length counts the text tokens of a sample; an image adds its codes and two markers."""
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    """The parent image tokenizer's architecture, copied into the config at training time."""
    z_loss: float = 1e-5
    """Weight of Chameleon's z-loss, mean of log^2 Z over the counted positions (0 disables)."""
    factored_codes: bool = False
    """Give the LM each code's FSQ level digits: a code's input embedding adds one learned vector per
    (channel, level), and its logit adds one learned score per (channel, level), so codes that share
    levels (similar colours and edges) share what is learned about them from the first step."""
    code_positions: bool = False
    """Add each code's row and column in the image (learned embeddings) to its input embedding: the
    image's span starts at a different position in every sequence, so the LM's own positions do not
    say where in the image a code is."""
    text_vocab_size: int = 0
    """The id of image code 0 in the stage's tokenizer (set from it: data.tokenizer.code_offset); image code c
    is token text_vocab_size + c, a named special token (data.tokenizer.IMAGE_CODE)."""
    language: CausalLMConfig | None = None
    """The language parent's architecture (model.lm_parent), copied into the config at training time: the
    transformer is then that LM, its table grown by the image span tokens and the codes (`lm` gives only the
    text context_length)."""

    @property
    def lm_width(self) -> int:
        return self.language.width if self.language is not None else self.lm.width

    def validate(self) -> None:
        self.lm.validate()
        self.image_tokenizer.validate()
        if self.language is not None:
            self.language.validate()
        if self.z_loss < 0:
            raise ValueError(f"z_loss {self.z_loss} must be >= 0")

    def set_vocab_size(self, vocab_size: int) -> None:
        """`vocab_size`: the whole tokenizer's, its image codes included."""
        codes = self.image_tokenizer.codebook_size
        if not self.text_vocab_size or self.text_vocab_size + codes > vocab_size:
            raise ValueError(f"the tokenizer's {vocab_size} tokens do not hold the image tokenizer's {codes} codes "
                             f"from id {self.text_vocab_size}")
        self.lm.vocab_size = vocab_size
        if self.language is not None:  # the parent's table may be larger than its tokenizer
            self.language.vocab_size = max(self.lm.vocab_size, self.language.vocab_size)

    def preprocess(self) -> PreprocessConfig:
        """Text in the LM's chat format (an imported language parent's own template)."""
        chat = {} if self.language is None else {"chat_template": self.language.chat_template,
                                                 "chat_tokens": self.language.chat_tokens}
        return PreprocessConfig(image_size=self.image_tokenizer.image_size, context_length=self.lm.context_length,
                                **chat)


class UnifiedModel(TextGenerator):
    family = "unified"

    def __init__(self, cfg: UnifiedConfig, eos_id: int):
        super().__init__()
        cfg.validate()
        self.cfg, self.eos_id = cfg, eos_id
        self.image_tokenizer = ImageTokenizer(cfg.image_tokenizer).requires_grad_(False)
        self.offset = cfg.text_vocab_size
        self.start_id, self.end_id = self.offset - 2, self.offset - 1
        """The span's tokens (set from the tokenizer by models.build_model_for)."""
        self.image_codes = self.image_tokenizer.grid ** 2
        self.extra_positions = self.image_codes + 1  # <image> becomes start + codes + end
        self.lm = decoder_lm(cfg.lm, cfg.language, eos_id, cfg.lm.context_length + self.extra_positions,
                             f"{self.image_codes + 2} of an image's span and {cfg.lm.context_length} text tokens "
                             "of a sample")
        if cfg.factored_codes:
            levels = torch.tensor(cfg.image_tokenizer.levels)
            starts = torch.cat([levels.new_zeros(1), levels.cumsum(0)[:-1]])
            digits = self.image_tokenizer.quantizer.indices_to_level_indices(
                torch.arange(self.image_tokenizer.codebook_size)).long()  # (codes, channels)
            self.register_buffer("code_digits", digits + starts, persistent=False)
            incidence = torch.zeros(int(levels.sum()), len(digits))
            incidence.scatter_(0, self.code_digits.T, 1.0)  # (channel levels, codes): a code's digits
            self.register_buffer("code_incidence", incidence, persistent=False)
            self.digit_embed = nn.Embedding(int(levels.sum()), cfg.lm_width)
            nn.init.normal_(self.digit_embed.weight, std=0.02)  # the scale of the LM's own embeddings
            self.digit_head = nn.Linear(cfg.lm_width, int(levels.sum()), bias=False)
        if cfg.code_positions:
            self.code_row = nn.Embedding(self.image_tokenizer.grid, cfg.lm_width)
            self.code_column = nn.Embedding(self.image_tokenizer.grid, cfg.lm_width)
            for table in (self.code_row, self.code_column):
                nn.init.normal_(table.weight, std=0.02)

    def image_ids(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized -> (B, codes + 2) token ids: start, codes + offset, end."""
        with torch.no_grad():
            codes = self.image_tokenizer.encode(images.to(self.image_tokenizer.decoder[0].weight.dtype))
        return torch.cat([codes.new_full((len(codes), 1), self.start_id), codes + self.offset,
                          codes.new_full((len(codes), 1), self.end_id)], dim=1)

    def embed(self, ids: torch.Tensor, first_code: int = 0) -> torch.Tensor:
        """Token ids (B, T; text, and at most one image's codes, in order) -> input embeddings (B, T, D).
        `first_code`: the index in the image of the first code in `ids` (generation feeds one at a time)."""
        x = self.lm.embed(ids)
        code_mask = ids >= self.offset
        is_code = code_mask[..., None].to(x.dtype)
        if self.cfg.factored_codes:
            x = x + self.digit_embed(self.code_digits[(ids - self.offset).clamp(min=0)]).sum(-2) * is_code
        if self.cfg.code_positions:
            index = (first_code + torch.cumsum(code_mask, dim=1) - 1).clamp(0, self.image_codes - 1)
            grid = self.image_tokenizer.grid
            x = x + (self.code_row(index // grid) + self.code_column(index % grid)) * is_code
        return x

    def head(self, states: torch.Tensor) -> torch.Tensor:
        logits = self.lm.head(states)
        if not self.cfg.factored_codes:
            return logits
        codes = self.digit_head(states) @ self.code_incidence.to(states.dtype)  # (..., codes)
        end = self.offset + codes.shape[-1]  # a language parent's table may have rows after the codes
        return torch.cat([logits[..., :self.offset], logits[..., self.offset:end] + codes, logits[..., end:]], dim=-1)

    def logits(self, input_ids: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """Training: a full mixed sequence (B, T) of text and image ids -> logits (B, T, V); `packing`
        for packed questions (data.pack_length), in the same positions as the ids."""
        return self.head(self.lm(self.embed(input_ids), packing=packing))

    # ----- reading: TextGenerator's generate and score -----
    def context(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.image_ids(images))

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None, packing: Packing | None = None) -> torch.Tensor:
        return splice_hidden(self.lm, input_ids, context, start, caches, packing, self.image_id)

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Text is written with text ids only."""
        return logits.index_fill(-1, torch.arange(self.offset, logits.shape[-1], device=logits.device), -torch.inf)

    # ----- drawing -----
    @torch.no_grad()
    def generate_image_codes(self, prompt_ids: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                             guidance: float = 1.0, generator: torch.Generator | None = None,
                             unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """Text prompts (B, L: drawing prompts, data/instruct.py, the same length in every row) -> (B, codes)
        image codes.

        Only image codes can be sampled inside the span (the rest of the vocabulary is never a
        candidate). With guidance != 1, classifier-free guidance mixes in the unconditional logits
        of `unconditional` (1, U: the drawing prompt of no caption; default the prompts' first token,
        mmpipe's <bos>) then <|image_start|> (training drops some captions to learn them):
        u + g * (c - u). temperature 0 is greedy; top_k > 0 keeps the k likeliest codes.
        """
        total = prompt_ids.shape[1] + 1 + self.image_codes
        if total > self.lm.max_positions:
            raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens and an image of {self.image_codes + 2} "
                             f"exceed the context of {self.lm.max_positions} positions")
        start = torch.full((len(prompt_ids), 1), self.start_id, device=prompt_ids.device)
        streams = [torch.cat([prompt_ids, start], dim=1)]
        if guidance != 1.0:
            empty = prompt_ids[:, :1] if unconditional is None else unconditional.to(prompt_ids).expand(len(start), -1)
            streams.append(torch.cat([empty, start], dim=1))
        caches = [self.lm.new_caches() for _ in streams]
        states = [self.lm(self.embed(ids), caches=c)[:, -1] for ids, c in zip(streams, caches)]
        codes = []
        for i in range(self.image_codes):
            logits = [self.head(h).float()[:, self.offset: self.offset + self.image_tokenizer.codebook_size]
                      for h in states]
            mixed = logits[0] if len(logits) == 1 else logits[1] + guidance * (logits[0] - logits[1])
            code = sample(mixed, temperature, top_k=top_k, generator=generator)
            codes.append(code)
            if i + 1 < self.image_codes:
                token = self.embed((code + self.offset)[:, None], first_code=i)
                states = [self.lm(token, start=ids.shape[1] + i, caches=c)[:, -1]
                          for ids, c in zip(streams, caches)]
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def generate_image(self, prompt_ids: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                       guidance: float = 1.0, generator: torch.Generator | None = None,
                       unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """Text prompts (B, L) -> images (B, 3, S, S), normalized, drawn by the image tokenizer's decoder."""
        codes = self.generate_image_codes(prompt_ids, temperature, top_k, guidance, generator, unconditional)
        return self.image_tokenizer.decode(codes)


def unified_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy over the labelled positions, the text and image parts weighed as two
    tasks (the mean over text tokens plus the mean over image codes: a drawing counts 64 codes and an
    answer a few words, so a mean over all tokens would leave reading about 5% of the gradient), plus
    the z-loss: logits (B, T, V), labels (B, T) (IGNORE where not counted)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    counted = targets != IGNORE
    log_z = torch.logsumexp(logits, -1)
    picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    nll = (log_z - picked)[counted]
    image = (targets >= model.offset)[counted]
    z_loss = model.cfg.z_loss * (log_z[counted] ** 2).mean()
    zero = nll.sum() * 0
    text_loss = nll[~image].mean() if (~image).any() else zero
    image_loss = nll[image].mean() if image.any() else zero
    return {"loss": text_loss + image_loss + z_loss, "text_loss": text_loss.detach(),
            "image_loss": image_loss.detach(), "z_loss": z_loss.detach()}
