"""A byte-level BPE tokenizer trained here, shaped like Qwen's (`Qwen2Tokenizer`).

Same pre-tokenizer as Qwen2 (digits split one by one, so "-1" is two tokens), same
normalizer and decoder, and the special tokens the chat template and the processor need.
Training is deterministic: the corpus is fixed (models/corpus.py) and BPE has no seed.
"""

from __future__ import annotations

import json
from typing import Iterable, List, Optional

from inference_worker.models.chat_templates import TEMPLATES
from inference_worker.models.corpus import corpus

# Order matters only for readability; ids follow the learned vocabulary.
SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen3 emits these as ordinary (non-special) added tokens, so decoding keeps them and
# the engine can strip the reasoning.
PLAIN_ADDED_TOKENS: List[str] = ["<think>", "</think>"]


def train_tokenizer(arch: str, vocab_size: int = 2048, texts: Optional[Iterable[str]] = None):
    """Train on the fixed corpus (or `texts`) and wrap as a transformers `Qwen2Tokenizer`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus() if texts is None else texts, trainer)
    learned = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Qwen2Tokenizer(
        vocab=learned["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tok.chat_template = TEMPLATES[arch]
    tok.padding_side = "left"
    return tok
