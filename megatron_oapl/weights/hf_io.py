"""Hugging Face model directories on disk: read tensors by name (lazily, from safetensors shards with
or without an index) and write an HF directory from a stream of named tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

_SINGLE = "model.safetensors"
_INDEX = INDEX_FILE = "model.safetensors.index.json"
# Files of an HF directory that are not weights (copied as they are on export).
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


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


def save_hf_model(named_tensors: Iterable[tuple[str, torch.Tensor]], side_files_from: str | Path,
                  out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` plus the config/tokenizer files of `side_files_from` into `out_dir` (holds
    every tensor at once: for small models and single shards; a run's export streams, weights/export.py)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: (t.to(dtype) if dtype else t).detach().contiguous().cpu() for n, t in named_tensors}
    save_file(tensors, str(out / _SINGLE), metadata={"format": "pt"})
    copy_side_files(side_files_from, out)
    return out


def copy_side_files(side_files_from: str | Path, out_dir: str | Path) -> None:
    """Copy the config and tokenizer files of an HF directory (those it has) into `out_dir`."""
    out = Path(out_dir)
    for name in _SIDE_FILES:
        src = Path(side_files_from) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copy2(src, out / name)
