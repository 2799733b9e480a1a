"""The caption tokenizer: byte-level BPE trained with HF `tokenizers` on the train split."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmcore import storage
from mmcore.data.config import TokenizerConfig

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]  # ids 0..4 in this order


def train_tokenizer(captions: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train BPE on `captions`; encodings are wrapped as <bos> ... <eos>."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
    )
    return tokenizer


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer.json (a local path or a path object in a bucket); the error names the file."""
    try:
        return Tokenizer.from_str(storage.path(path).read_text())
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ValueError(f"{path}: not a loadable tokenizer ({err})") from None


USER, ASSISTANT = "<|user|>", "<|assistant|>"
CHAT_TOKENS = [USER, ASSISTANT]
"""Roles of the chat format (data/instruct.py); added to the dataset's tokenizer by the fusion stage."""


IMAGE_START, IMAGE_END = "<|image_start|>", "<|image_end|>"
IMAGE_SPAN_TOKENS = [IMAGE_START, IMAGE_END]
"""Around an image's codes in the unified stage's sequences."""
IMAGE_CODE = "<|image_code_{}|>"
"""Image code c of the unified stage's image tokenizer, a special token of its tokenizer (Chameleon, Anole
and Emu3 name their visual tokens the same way): image code c is the id of IMAGE_CODE.format(0) plus c."""


def image_code_tokens(codebook_size: int) -> list[str]:
    return [IMAGE_CODE.format(c) for c in range(codebook_size)]


def code_offset(tokenizer: Tokenizer) -> int:
    """The id of image code 0 in a unified model's tokenizer (its codes follow it in order)."""
    first = tokenizer.token_to_id(IMAGE_CODE.format(0))
    if first is None:
        raise ValueError(f"the tokenizer names no image codes ({IMAGE_CODE.format(0)}, ...): a unified model's "
                         "tokenizer has its image tokenizer's codes as special tokens (tasks.UnifiedTask.tokenizer)")
    return first


def with_tokens(tokenizer_json: str, tokens: list[str]) -> str:
    """A tokenizer with `tokens` added as special tokens when it lacks them (ids after its vocabulary, in order)."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.add_special_tokens([token for token in tokens if tokenizer.token_to_id(token) is None])
    return tokenizer.to_str()


def with_chat_tokens(tokenizer_json: str) -> str:
    """The dataset's tokenizer with the chat roles (the fusion stage's)."""
    return with_tokens(tokenizer_json, CHAT_TOKENS)
