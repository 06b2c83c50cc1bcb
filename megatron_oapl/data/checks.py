"""Check a run's data where `oapl train` starts, before any evaluation, rank or engine: a bad record then
costs seconds and one `error:` line naming the file and line, not a crash deep inside a spawned rank
(where the coordinator and the engines read the same data).

    check_run_data(cfg)   # DataError / TokenizerError, or a one-line summary of what was read
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_oapl.rollout.orders import check_prompt_count

from .prompts import DataError, load_prompts
from .tokenizer import load_tokenizer, stop_token_ids

__all__ = ["check_run_data"]


def check_run_data(cfg: Any) -> str:
    """Read, validate and tokenise both prompt splits (and the offline rollout dataset, if any) exactly as
    the run will; the tokenizer is model.hf_path's, the one the engines use."""
    tokenizer = load_tokenizer(cfg.model.hf_path)
    try:
        stop_token_ids(tokenizer)
    except ValueError as err:
        raise DataError(f"model.hf_path={cfg.model.hf_path!r}: {err}") from None
    counts = {}
    for split in ("train", "eval"):
        prompts = load_prompts(cfg.data, split, tokenizer)
        empty = next((p for p in prompts if not p.token_ids), None)
        if empty is not None:
            raise DataError(f"{split} prompt {empty.prompt_id!r} encodes to no tokens with the tokenizer of "
                            f"model.hf_path={cfg.model.hf_path!r} (is it the model's tokenizer?)")
        counts[split] = len(prompts)
        if split == "train":
            _check_token_budget(cfg, prompts)
            check_prompt_count(cfg, len(prompts))  # dynamic sampling refills from the real prompt set
    summary = f"data: {counts['train']} train and {counts['eval']} eval prompts"
    if cfg.lag.mode == "offline":
        from megatron_oapl.rollout.dataset import RolloutDataset

        try:  # every line, streamed: a wrong type there would otherwise end a rank mid-run
            groups = RolloutDataset(cfg.lag.offline_dataset, cfg.fleet, _model_vocab_size(cfg, tokenizer))
            groups.check_every_line()
        except (OSError, ValueError) as err:  # its errors name the file and line already
            raise DataError(str(err)) from None
        summary += f", {len(groups)} offline rollout groups"
    return summary


def _model_vocab_size(cfg: Any, tokenizer) -> int:
    """The rows of the model's embedding (what a sampled token id indexes): config.json's vocab_size at
    model.hf_path, else the tokenizer's length."""
    config = Path(cfg.model.hf_path) / "config.json"
    try:
        return int(json.loads(config.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(tokenizer)


def _check_token_budget(cfg: Any, prompts) -> None:
    """A token budget below the longest prompt + 1 token could never hold a training sequence."""
    from megatron_oapl.config import ConfigError

    budget = cfg.parallel.micro_batch_tokens
    longest = max((len(p.token_ids) for p in prompts), default=0)
    if budget and budget < longest + 1:
        raise ConfigError(f"parallel.micro_batch_tokens={budget} is below the longest train prompt "
                          f"({longest} tokens) + 1 completion token (allowed: >= {longest + 1}, or 0 = off)")
