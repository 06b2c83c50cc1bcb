"""Prompt datasets -> `Prompt`s: reasoning-gym tasks, JSONL files, Parquet files (`data.source`).

    train = load_prompts(cfg.data, "train", tokenizer)   # tokenizer optional: fills Prompt.token_ids
    held_out = load_prompts(cfg.data, "eval", tokenizer)

`Prompt.text` is always the raw question (rewards compare against it); the chat template is applied only
to produce `token_ids` (`templates.render_prompt` + `tokenizer.encode_prompt`). Without a tokenizer
`token_ids` is empty and the caller tokenises.

reasoning_gym: `reasoning_gym.create_dataset(data.task, seed, size, **data.task_kwargs)`.
- train: seed = data.seed, the first data.num_train_prompts entries; ids `"{task}/train/{i}"`.
- eval: seed = data.seed + EVAL_SEED_OFFSET; entries whose question also occurs in the train split (or
  earlier in eval) are dropped, and more candidates are drawn until data.num_eval_prompts are found
  (up to EVAL_CANDIDATE_FACTOR x as many; a small task space may then give fewer, with a warning).
  ids are `"{task}/eval/{i}"` with i the entry's index in the eval dataset, so they skip dropped ones.
- `answer` = entry["answer"]; `metadata` = {"task", "entry_metadata"} with the entry's metadata made
  JSON-able (sets -> lists, unknown objects -> str; tuples kept, they pickle and dump as arrays).
Same config, same prompts: the generation is a function of the seed and the index only.

jsonl / parquet: records {"prompt": str, "answer": str | number | null, "metadata": mapping (optional;
in Parquet also a JSON string), "id": str | int (optional)}. A bad record raises `DataError` naming the
file and line (JSONL, 1-based; blank lines are skipped) or row (Parquet, 0-based). The split's file:
- data.path containing "{split}" -> that placeholder replaced by "train" / "eval";
- data.path a directory -> `<dir>/<split>.jsonl` (`.parquet`);
- otherwise the same file for both splits: train takes its first num_train_prompts records and eval its
  first num_eval_prompts, so eval is NOT held out (a warning says so) — give "{split}" paths for that.
ids default to `"{file stem}/{split}/{record index}"`; duplicate ids are a DataError.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

from megatron_oapl.config import CHOICES, ConfigError
from megatron_oapl.rollout.types import Prompt

__all__ = ["DataError", "SPLITS", "EVAL_SEED_OFFSET", "load_prompts", "load_split", "prompt_token_ids",
           "jsonable"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
EVAL_SEED_OFFSET = 1_000_003
EVAL_CANDIDATE_FACTOR = 4


class DataError(ValueError):
    """The run's data cannot be used (a malformed record, a prompt that encodes to nothing); the message
    names the file and line / row, or the prompt."""


def load_prompts(data_cfg: Any, split: str, tokenizer: Any = None) -> list[Prompt]:
    """The prompts of `split` ("train" | "eval") from `data_cfg` (a `DataConfig`).

    With a tokenizer, `token_ids` holds the templated prompt (data.chat_template) encoded.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of: {', '.join(SPLITS)}")
    source = data_cfg.source
    if source == "reasoning_gym":
        prompts = _reasoning_gym(data_cfg, split)
    elif source in ("jsonl", "parquet"):
        prompts = _from_file(data_cfg, split, source)
    else:
        raise ConfigError(f"data.source={source!r} must be one of: {', '.join(CHOICES['data.source'])}")
    return _encoded(prompts, tokenizer, data_cfg.chat_template)


def prompt_token_ids(tokenizer: Any, chat_template: str | None, text: str) -> list[int]:
    """The one render + encode path: the chat template applied to `text`, then encoded (engines, checks)."""
    from .templates import render_prompt
    from .tokenizer import encode_prompt

    return encode_prompt(tokenizer, render_prompt(tokenizer, chat_template, text))


def load_split(run_cfg: Any, split: str, tokenizer: Any = None) -> list[Prompt]:
    """The prompts of a work order's split: "train", "eval" (the data section's held-out prompts) or
    "eval/<set>" (eval.sets.<set>: a reasoning-gym task, held out against the run's training prompts;
    or a prepared .jsonl / .parquet file)."""
    if not split.startswith("eval/"):
        return load_prompts(run_cfg.data, split, tokenizer)
    import dataclasses

    spec = run_cfg.eval.sets[split.removeprefix("eval/")]
    if spec["source"] == "reasoning_gym":
        want = spec.get("num_eval_prompts", run_cfg.data.num_eval_prompts)
        data = dataclasses.replace(run_cfg.data, source="reasoning_gym", task=spec.get("task", run_cfg.data.task),
                                   task_kwargs=dict(spec.get("task_kwargs") or {}), num_eval_prompts=want)
        # Held out against what the run trains on (when that is a reasoning-gym task too).
        prompts = _reasoning_gym(data, "eval", run_cfg.data if run_cfg.data.source == "reasoning_gym" else None)
        return _encoded(prompts, tokenizer, run_cfg.data.chat_template)
    path = Path(spec["path"])
    if not path.is_file():
        raise DataError(f"eval.sets.{split.removeprefix('eval/')}: the file {path} does not exist")
    # A prepared set (a benchmark) is evaluated whole unless num_eval_prompts says otherwise.
    want = spec.get("num_eval_prompts", math.inf)
    prompts = _read_file(path, "parquet" if path.suffix == ".parquet" else "jsonl", want, "eval")
    return _encoded(prompts, tokenizer, run_cfg.data.chat_template)


def _encoded(prompts: list[Prompt], tokenizer: Any, chat_template: str | None) -> list[Prompt]:
    if tokenizer is not None:
        for p in prompts:
            p.token_ids = prompt_token_ids(tokenizer, chat_template, p.text)
    return prompts


# --------------------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """`obj` with everything JSON cannot hold converted (sets -> sorted lists, numpy scalars -> numbers,
    other objects -> str, non-scalar dict keys -> str); dicts, lists, tuples and scalars kept."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(jsonable(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=repr)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return jsonable(obj.tolist())
    return str(obj)


def _create_dataset(cfg: Any, seed: int, size: int) -> Any:
    import reasoning_gym  # here: importing reasoning-gym takes seconds

    kwargs = dict(cfg.task_kwargs or {})
    for key, field in (("seed", "data.seed"), ("size", "data.num_train_prompts / data.num_eval_prompts")):
        if key in kwargs:
            raise ConfigError(f"data.task_kwargs must not set {key!r} (it comes from {field})")
    try:
        return reasoning_gym.create_dataset(cfg.task, seed=seed, size=size, **kwargs)
    except ValueError as e:
        if "not registered" in str(e):
            raise ConfigError(f"data.task={cfg.task!r} is not a reasoning-gym dataset ({e})") from e
        raise ConfigError(f"data.task_kwargs={kwargs!r} are not valid for reasoning-gym task "
                          f"{cfg.task!r}: {e}") from e
    except (TypeError, AssertionError) as e:
        raise ConfigError(f"data.task_kwargs={kwargs!r} are not valid for reasoning-gym task "
                          f"{cfg.task!r}: {e or type(e).__name__}") from e


def _rg_prompt(task: str, split: str, index: int, entry: dict[str, Any]) -> Prompt:
    return Prompt(prompt_id=f"{task}/{split}/{index}", token_ids=[], text=entry["question"],
                  answer=entry["answer"],
                  metadata={"task": task, "entry_metadata": jsonable(entry.get("metadata", {}))})


def _reasoning_gym(cfg: Any, split: str, train_cfg: Any = None) -> list[Prompt]:
    """`train_cfg`: the data whose train split eval prompts are held out against (default `cfg`; an eval
    set of another task or kwargs passes the run's data section)."""
    train_cfg = cfg if train_cfg is None else train_cfg
    train = _create_dataset(train_cfg, train_cfg.seed, train_cfg.num_train_prompts)
    if split == "train":
        return [_rg_prompt(cfg.task, split, i, train[i]) for i in range(cfg.num_train_prompts)]
    want = cfg.num_eval_prompts
    if want <= 0:
        return []
    seen = {train[i]["question"] for i in range(train_cfg.num_train_prompts)}
    candidates = EVAL_CANDIDATE_FACTOR * want + 16
    pool = _create_dataset(cfg, cfg.seed + EVAL_SEED_OFFSET, candidates)
    prompts: list[Prompt] = []
    dropped = 0
    for i in range(candidates):
        entry = pool[i]
        if entry["question"] in seen:
            dropped += 1
            continue
        seen.add(entry["question"])
        prompts.append(_rg_prompt(cfg.task, split, i, entry))
        if len(prompts) == want:
            break
    if len(prompts) < want:
        logger.warning("reasoning-gym task %r: only %d distinct eval prompts outside the train split among "
                       "%d candidates (data.num_eval_prompts=%d); the task's question space is small",
                       cfg.task, len(prompts), candidates, want)
    elif dropped:
        logger.debug("reasoning-gym task %r: dropped %d eval candidates that repeat a train (or earlier "
                     "eval) question", cfg.task, dropped)
    return prompts


# --------------------------------------------------------------------------------------------------
# JSONL / Parquet
# --------------------------------------------------------------------------------------------------


def _split_path(cfg: Any, split: str, ext: str) -> tuple[Path, bool]:
    """(file of the split, whether both splits share it)."""
    if not cfg.path:
        raise ConfigError(f"data.path=null must be set when data.source={cfg.source!r}")
    if "{split}" in cfg.path:
        path, shared = Path(cfg.path.replace("{split}", split)), False
    elif Path(cfg.path).is_dir():
        path, shared = Path(cfg.path) / f"{split}.{ext}", False
    else:
        path, shared = Path(cfg.path), True
    if not path.is_file():
        raise DataError(f"data.path={cfg.path!r}: the {split} file {path} does not exist")
    return path, shared


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "answer"):
        if key not in rec:
            keys = ", ".join(map(str, rec)) or "none"
            raise DataError(f"{where}: missing required key {key!r} (keys: {keys})")
    if not isinstance(rec["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string, got {type(rec['prompt']).__name__}")
    ans = rec["answer"]
    number = isinstance(ans, (int, float)) and not isinstance(ans, bool)
    if not (ans is None or isinstance(ans, str) or number):
        raise DataError(f"{where}: 'answer' must be a string, a number or null, got {type(ans).__name__}")
    meta = rec.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{where}: 'metadata' must be a mapping, got {type(meta).__name__}")
    rid = rec.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(rid).__name__}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e})") from None
            _check_record(rec, where)
            yield where, rec


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("prompt", "answer") if c not in names]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(map(repr, missing))} "
                        f"(columns: {', '.join(sorted(names))})")
    columns = [c for c in ("prompt", "answer", "metadata", "id") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for rec in batch.to_pylist():
            where = f"{path} row {row}"
            if isinstance(rec.get("metadata"), str):  # metadata stored as JSON text
                try:
                    rec["metadata"] = json.loads(rec["metadata"])
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: 'metadata' is a string but not valid JSON ({e})") from None
            _check_record(rec, where)
            yield where, rec
            row += 1


def _from_file(cfg: Any, split: str, source: str) -> list[Prompt]:
    path, shared = _split_path(cfg, split, source)
    want = cfg.num_train_prompts if split == "train" else cfg.num_eval_prompts
    if shared and split == "eval":
        logger.warning("data.path=%r has no '{split}' placeholder: eval prompts come from the same file as "
                       "train prompts and are not held out", cfg.path)
    return _read_file(path, source, want, split)


def _read_file(path: Path, source: str, want: int, split: str) -> list[Prompt]:
    """The first `want` records of a prompt file as `Prompt`s (ids default to "{stem}/{split}/{index}")."""
    if want <= 0:
        return []
    records = _iter_jsonl(path) if source == "jsonl" else _iter_parquet(path)
    prompts: list[Prompt] = []
    first_seen: dict[str, str] = {}
    for index, (where, rec) in enumerate(records):
        pid = str(rec["id"]) if rec.get("id") is not None else f"{path.stem}/{split}/{index}"
        if pid in first_seen:
            raise DataError(f"{where}: duplicate id {pid!r} (first at {first_seen[pid]})")
        first_seen[pid] = where
        prompts.append(Prompt(prompt_id=pid, token_ids=[], text=rec["prompt"], answer=rec["answer"],
                              metadata=dict(rec.get("metadata") or {})))
        if len(prompts) == want:  # stop before reading (and validating) records that are not used
            break
    return prompts
