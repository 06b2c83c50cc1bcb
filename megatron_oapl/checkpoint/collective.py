"""The checkpoint code's collectives over the default process group, all no-ops without one (a single
process: `oapl convert`, tests), and verification with the sha256 work shared by the ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_oapl.checkpoint.files import manifest_problem, sha256_file, size_problem


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Objects of every rank on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if this_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def hash_shared(root: Path, rel_paths: list[str]) -> dict[str, str] | None:
    """sha256 of `rel_paths` (identical list on every rank), the work split over ranks; the result
    on rank 0. Hashing a checkpoint of hundreds of GB on one rank would stall the run."""
    mine = {rel: sha256_file(root / rel) for rel in rel_paths[this_rank()::world_size()]}
    parts = gather(mine)
    return None if parts is None else {k: v for part in parts for k, v in part.items()}


def verify_collective(ckpt: Path) -> str | None:
    """`verify_checkpoint` with the hashing shared by all ranks; the verdict is the same on every rank."""
    problem, entries = (None, [])
    if this_rank() == 0:
        problem, entries = manifest_problem(ckpt)
        if problem is None:
            problem = size_problem(ckpt, entries)
    problem, entries = broadcast((problem, entries))
    if problem is not None:
        return problem
    hashes = hash_shared(ckpt, [e["path"] for e in entries])
    if this_rank() == 0:
        bad = [e["path"] for e in entries if hashes[e["path"]] != e["sha256"]]
        if bad:
            problem = f"file {bad[0]} does not match its sha256 in the manifest (corrupted)"
    return broadcast(problem)
