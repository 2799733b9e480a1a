"""What every model that writes text about an image shares: `generate` (greedy or nucleus, KV
cache) and `score` (log-likelihood), on top of two methods a family supplies: `context(images)`
makes the image information, `hidden(input_ids, context, start, caches)` runs the LM with it.
Logits line up with input_ids: logits[:, t] predicts input_ids[:, t + 1], whatever the family does
with the image. `splice_hidden` is the early-fusion way (LLaVA, unified): the image's token
embeddings stand in the sequence where the `<image>` token is.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcore.data.tokenizer import IMAGE, SPECIAL_TOKENS
from mmcore.models.decoder import DecoderLM, Packing
from mmcore.models.sampling import sample
from mmcore.models.transformer import KVCache

IMAGE_ID = SPECIAL_TOKENS.index(IMAGE)
IGNORE = -100
"""Label of a position the loss does not count (prompt, image, padding), as in torch's cross_entropy."""


class TextGenerator(nn.Module):
    """Base of the models that generate text: `lm` (a DecoderLM), `eos_id`, and per family `context`
    and `hidden`."""

    lm: DecoderLM
    eos_id: int
    image_id = IMAGE_ID
    """The <image> token's id: mmpipe's tokenizers' fixed one, or where it was added to an imported LM's
    (models.build_model_for)."""
    extra_positions = 0
    """LM positions a sample takes beyond its text tokens (LLaVA: the image tokens minus <image>)."""

    def merge_adapters(self) -> None:
        """LoRA adapters and new rows on a language parent's LM merged into its weights (before saving)."""
        if hasattr(self.lm, "merge_adapters"):
            self.lm.merge_adapters()

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """(B, 3, H, W), (B, L) -> logits (B, L, V); `packing` in text positions (the <image> token one)."""
        return self.head(self.hidden(input_ids, self.context(images), packing=packing))

    def head(self, states: torch.Tensor) -> torch.Tensor:
        """LM states (..., D) -> logits over the vocabulary (..., V)."""
        return self.lm.head(states)

    @torch.no_grad()
    def score(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of log p(token) over the labelled tokens of each row: (B,) (the answer's log-likelihood)."""
        logits = self(images, input_ids)[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (targets != IGNORE)).sum(1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each prompt (B, L; all rows the same length, no padding) -> new ids (B, T), T <= max_new_tokens.

        Greedy when temperature is 0, else nucleus sampling (top_p); never the <image> token. A row
        that produced <eos> is padded with <eos> until every row has. Without the cache every step
        reruns the whole sequence: the same tokens, slower (a test holds them equal).
        """
        limit = self.lm.max_positions - self.extra_positions - prompt_ids.shape[1]
        if limit < 1:
            raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens leaves no room in the context of "
                             f"{self.lm.max_positions - self.extra_positions}")
        context = self.context(images)
        caches = self.lm.new_caches() if use_cache else None
        last = self.hidden(prompt_ids, context, caches=caches)[:, -1]
        ids, done = prompt_ids, torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
        for _ in range(min(max_new_tokens, limit)):
            logits = self.text_logits(self.head(last).float())
            logits[:, self.image_id] = -torch.inf  # an answer never asks for another image
            token = sample(logits, temperature, top_p=top_p, generator=generator)
            token = torch.where(done, torch.full_like(token, self.eos_id), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.eos_id
            if done.all():
                break
            if caches is not None:
                start = ids.shape[1] - 1 + self.extra_positions
                last = self.hidden(token[:, None], context, start=start, caches=caches)[:, -1]
            else:
                last = self.hidden(ids, context)[:, -1]
        return ids[:, prompt_ids.shape[1]:]

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary -> those generation picks text from (all, unless a family says)."""
        return logits

    # ----- per family -----
    def context(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None, packing: Packing | None = None) -> torch.Tensor:
        raise NotImplementedError


def splice_hidden(lm: DecoderLM, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
                  caches: list[KVCache] | None = None, packing: Packing | None = None,
                  image_id: int = IMAGE_ID) -> torch.Tensor:
    """Text (B, L) with one <image> token per row, image tokens (B, N, D) -> LM states at the text
    positions (B, L, D); the <image> position gets the state of the last image token, which predicts
    the token after <image>. Continuing after a prefill (start > 0), the ids are text only and follow
    the image. A packing's image stands in the shared prefix, before every packed sequence."""
    text = lm.embed(input_ids)  # (B, L, D)
    if start:
        return lm(text, start=start, caches=caches)
    at = _image_position(input_ids, image_id)  # (B,)
    length, n = input_ids.shape[1], context.shape[1]
    j = torch.arange(length + n - 1, device=input_ids.device)[None]  # positions of the spliced sequence
    in_image = (j >= at[:, None]) & (j < at[:, None] + n)  # (B, L + N - 1)
    text_index = torch.where(j < at[:, None], j, j - n + 1).clamp(0, length - 1)
    image_index = (j - at[:, None]).clamp(0, n - 1)
    spliced = torch.where(in_image[..., None], _take(context, image_index), _take(text, text_index))
    if packing is not None:
        positions = packing.positions.gather(1, text_index)
        packing = Packing(torch.where(in_image, 0, packing.segments.gather(1, text_index)),
                          torch.where(in_image, j, positions + (n - 1) * (positions > at[:, None])))
    states = lm(spliced, caches=caches, packing=packing)  # (B, L + N - 1, D)
    t = torch.arange(length, device=input_ids.device)[None]
    return _take(states, torch.where(t < at[:, None], t, t + n - 1))


def _image_position(input_ids: torch.Tensor, image_id: int) -> torch.Tensor:
    is_image = input_ids == image_id
    counts = is_image.sum(1)
    if not bool((counts == 1).all()):
        row = int((counts != 1).nonzero()[0])
        raise ValueError(f"row {row}: a prompt needs exactly one <image> token, it has {int(counts[row])}")
    return is_image.int().argmax(1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) at index (B, M) -> (B, M, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
