"""The final HF export of a run, streamed: no rank ever holds more than one shard of the model.

Every pipeline stage's sender (DP rank 0, TP rank 0: the rank that pushes the stage's weights) writes the
stage's TP-gathered tensors as they come, tensor by tensor, into safetensors shards of at most
`shard_bytes` (`model-s{stage}-{k}.safetensors`) and a partial index of what it wrote; the stage's other TP
ranks take part in the gathers only. After a barrier, rank 0 (stage 0's sender) merges the partial indexes
into `model.safetensors.index.json`, removes weight files of an earlier export that the index does not
name, and copies the config and tokenizer files. Nothing is gathered across ranks but the per-tensor TP
gathers of a push; the files are the only meeting point of the stages (a shared file system, as the run
directory already is).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_oapl.weights.hf_io import INDEX_FILE, copy_side_files
from megatron_oapl.weights.reshard import iter_hf_tensors
from megatron_oapl.weights.sync import is_stage_sender

DEFAULT_SHARD_BYTES = 2 << 30
_PARTIAL = "index.stage-{stage:03d}.json"  # a stage's part of the index, merged (and removed) by rank 0


def export_hf_model(model_chunks: list, mapping, ctx, side_files_from: str | Path, out_dir: str | Path,
                    shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path | None:
    """Collective over the learners' world. Returns the directory on rank 0, None elsewhere."""
    out = Path(out_dir)
    if ctx.dp_rank == 0:
        tensors = iter_hf_tensors(model_chunks, mapping)
        if is_stage_sender(ctx):
            out.mkdir(parents=True, exist_ok=True)
            write_stage_shards(tensors, out, ctx.pp_rank, shard_bytes)
        else:
            for _ in tensors:  # a TP peer of the sender: the gathers are collective
                pass
    dist.barrier()  # every stage's shards and partial index are on disk
    if not ctx.is_coordinator:
        return None
    merge_stage_indexes(out, ctx.pp_size)
    copy_side_files(side_files_from, out)
    return out


def write_stage_shards(named_tensors: Iterable[tuple[str, torch.Tensor]], out: Path, stage: int,
                       shard_bytes: int) -> dict[str, str]:
    """Write one stage's tensors into shards as they come (one shard in memory at a time) and its partial
    index; returns the stage's weight map (name -> file)."""
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
        tensor = tensor.detach().to("cpu", copy=True).contiguous()  # a copy: never an alias of a live parameter
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


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
