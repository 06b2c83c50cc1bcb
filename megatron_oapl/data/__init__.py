"""Prompt datasets, prompt templates and tokenizers.

- :mod:`.prompts`: ``load_prompts(data_cfg, split, tokenizer=None)`` (reasoning-gym / JSONL / Parquet),
  ``DataError``.
- :mod:`.templates`: ``TEMPLATES``, ``apply_template``, ``render_prompt`` (tokenizer chat templates).
- :mod:`.tokenizer`: ``load_tokenizer``, ``encode_prompt``, ``stop_token_ids``,
  ``train_sentencepiece_tokenizer`` (the embedded default's tiny tokenizer), ``TokenizerError``.
- :mod:`.checks`: ``check_run_data(cfg)``: a run's data read and tokenised up front (`oapl train`); not
  imported here, since it reads the offline rollout dataset through `rollout/`, a layer above `data/`.
- :mod:`.prepare`: ``oapl data prepare`` (Hugging Face math / code datasets -> the train/eval files above).

Heavy libraries (reasoning-gym, transformers, sentencepiece, pyarrow) are imported inside the functions
that need them.
"""

from .prompts import DataError, load_prompts
from .templates import TEMPLATES, apply_template, render_prompt
from .tokenizer import TokenizerError, encode_prompt, load_tokenizer, stop_token_ids, train_sentencepiece_tokenizer

__all__ = [
    "DataError",
    "TokenizerError",
    "load_prompts",
    "TEMPLATES",
    "apply_template",
    "render_prompt",
    "load_tokenizer",
    "encode_prompt",
    "stop_token_ids",
    "train_sentencepiece_tokenizer",
]
