"""Hugging Face model directories on disk: read tensors by name (lazily, from safetensors shards with
or without an index), and the one writer of an HF directory (`oapl train`'s final export and `oapl convert
megatron-to-hf` both go through it, by `weights/export.export_hf_model`).

The writer streams: each pipeline stage writes its tensors as they come into shards of at most
`SHARD_BYTES` (`model-s{stage}-{k}.safetensors`) and a partial index (`write_stage_shards`, one shard in
memory at a time); one process then merges the partial indexes into `model.safetensors.index.json` and
removes weight files of an earlier export (`merge_stage_indexes`); `copy_side_files` copies the config and
tokenizer files (`SIDE_FILES`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_oapl.data.tokenizer import TOKENIZER_FILES

_SINGLE = "model.safetensors"
_INDEX = INDEX_FILE = "model.safetensors.index.json"
_PARTIAL = "index.stage-{stage:03d}.json"  # a stage's part of the index, merged (and removed) by one process
SHARD_BYTES = 2 << 30
# Files of an HF directory that are not weights (copied as they are on export).
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def hf_tensor_reader(hf_dir: str | Path) -> Callable[[str], torch.Tensor]:
    """`get(name) -> tensor` over an HF directory's safetensors files (opened lazily)."""
    from safetensors import safe_open

    root = Path(hf_dir)
    if (root / _INDEX).is_file():
        weight_map = json.loads((root / _INDEX).read_text())["weight_map"]
    elif (root / _SINGLE).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(f"{root} has neither {_SINGLE} nor {_INDEX}")
    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        file = weight_map.get(name) if weight_map is not None else _SINGLE
        if file is None:
            raise KeyError(f"{name} is not in {root / _INDEX}")
        if file not in handles:
            handles[file] = safe_open(str(root / file), framework="pt")
        return handles[file].get_tensor(name)

    return get


def write_stage_shards(named_tensors: Iterable[tuple[str, torch.Tensor]], out: Path, stage: int,
                       shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write one stage's tensors (cast to `dtype` when given) into shards as they come (one shard in memory at
    a time) and its partial index; returns the stage's weight map (name -> file)."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-s{stage:03d}-{len({*weight_map.values()}) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        shard, size = {}, 0

    for name, tensor in named_tensors:
        # A copy: never an alias of a live parameter.
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype, copy=True).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size, total = size + nbytes, total + nbytes
    if shard:
        flush()
    _write_json_atomically(out / _PARTIAL.format(stage=stage), {"total_size": total, "weight_map": weight_map})
    return weight_map


def merge_stage_indexes(out: Path, num_stages: int) -> dict:
    """The stages' partial indexes as one `model.safetensors.index.json`; weight files of an earlier export
    into the same directory that it does not name are removed (a loader would otherwise prefer a stale
    `model.safetensors`)."""
    weight_map: dict[str, str] = {}
    total = 0
    for stage in range(num_stages):
        partial_path = out / _PARTIAL.format(stage=stage)
        partial = json.loads(partial_path.read_text())
        repeated = set(weight_map) & set(partial["weight_map"])
        if repeated:
            raise RuntimeError(f"export: stage {stage} wrote {sorted(repeated)[:3]}, already written by another stage")
        weight_map.update(partial["weight_map"])
        total += partial["total_size"]
        partial_path.unlink()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json_atomically(out / INDEX_FILE, index)
    for stale in out.glob("*.safetensors"):
        if stale.name not in set(weight_map.values()):
            stale.unlink()
    return index


def copy_side_files(side_files_from: str | Path | None, out_dir: str | Path,
                    names: Iterable[str] = SIDE_FILES) -> None:
    """Copy the files `names` (default: config and tokenizer) that the HF directory `side_files_from` has
    into `out_dir` (None: nothing)."""
    if side_files_from is None:
        return
    out = Path(out_dir)
    for name in names:
        src = Path(side_files_from) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copy2(src, out / name)


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
