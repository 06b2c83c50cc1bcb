"""An HF export of a live learner, streamed: no rank ever holds more than one shard of the model. `oapl
train`'s final export and `oapl convert megatron-to-hf` both write through it.

Every pipeline stage's sender (DP rank 0, TP rank 0: the rank that pushes the stage's weights) writes the
stage's TP-gathered tensors as they come, tensor by tensor, into safetensors shards of at most
`shard_bytes` (`model-s{stage}-{k}.safetensors`) and a partial index of what it wrote; the stage's other TP
ranks (and its expert-parallel peers) take part in the gathers only. After a barrier, rank 0 (stage 0's
sender) merges the partial indexes into `model.safetensors.index.json`, removes weight files of an earlier
export that the index does not name, and copies the config and tokenizer files (the file formats:
weights/hf_io.py). Nothing is gathered across ranks but the per-tensor gathers of a push; the files are the only meeting point of the stages (a
shared file system, as the run directory already is).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_oapl.weights.hf_io import SHARD_BYTES, copy_side_files, merge_stage_indexes, write_stage_shards
from megatron_oapl.weights.reshard import gather_role, iter_hf_tensors
from megatron_oapl.weights.sync import is_stage_sender


def export_hf_model(model_chunks: list, mapping, ctx, side_files_from: str | Path | None, out_dir: str | Path,
                    shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> Path | None:
    """Collective over the learners' world. Weights in `dtype` (default: the parameters' own); the config and
    tokenizer files of `side_files_from` (None: none). Returns the directory on rank 0, None elsewhere."""
    out = Path(out_dir)
    role = gather_role(ctx)
    if role is not None:
        tensors = iter_hf_tensors(model_chunks, mapping, experts_only=role == "experts")
        if is_stage_sender(ctx):
            out.mkdir(parents=True, exist_ok=True)
            write_stage_shards(tensors, out, ctx.pp_rank, shard_bytes, dtype)
        else:
            for _ in tensors:  # a TP or EP peer of the sender: the gathers are collective
                pass
    dist.barrier()  # every stage's shards and partial index are on disk
    if not ctx.is_coordinator:
        return None
    merge_stage_indexes(out, ctx.pp_size)
    copy_side_files(side_files_from, out)
    return out
