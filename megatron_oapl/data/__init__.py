"""Prompt datasets, prompt templates and tokenizers.

- :mod:`.prompts`: ``load_prompts(data_cfg, split, tokenizer=None)`` (reasoning-gym / JSONL / Parquet),
  ``DataError``.
- :mod:`.templates`: ``TEMPLATES``, ``apply_template``, ``render_prompt`` (tokenizer chat templates).
- :mod:`.tokenizer`: ``load_tokenizer``, ``encode_prompt``, ``stop_token_ids``,
  ``train_sentencepiece_tokenizer`` (the embedded default's tiny tokenizer).
- :mod:`.prepare`: ``oapl data prepare`` (Hugging Face math / code datasets -> the train/eval files above).

Heavy libraries (reasoning-gym, transformers, sentencepiece, pyarrow) are imported inside the functions
that need them.
"""

from .prompts import DataError, load_prompts
from .templates import TEMPLATES, apply_template, render_prompt
from .tokenizer import encode_prompt, load_tokenizer, stop_token_ids, train_sentencepiece_tokenizer

__all__ = [
    "DataError",
    "load_prompts",
    "TEMPLATES",
    "apply_template",
    "render_prompt",
    "load_tokenizer",
    "encode_prompt",
    "stop_token_ids",
    "train_sentencepiece_tokenizer",
]
