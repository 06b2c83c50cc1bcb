"""Rank-side body of the bad-day checkpoint test (module level so spawn can import it)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from megatron_oapl.checkpoint import CheckpointManager
from megatron_oapl.config import from_dict
from megatron_oapl.disk import StorageError
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_policy
from megatron_oapl.learner.step import train_step
from tests.support.learner_workers import batch_from_dict
from tests.support.small_disk import fill_until_full


def _inject_enospc_at_the_writer() -> None:
    """Without a tmpfs to fill: Megatron's forked writers fail every item write with ENOSPC."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    filesystem_async._write_item = full


def save_then_fill_the_disk(cfg_dict: dict, batch_path: str, run_dir: str, disk_is_tmpfs: bool, out_path: str) -> None:
    """Save step 1, record this rank's child processes (none may stay after a save), fill the disk (or
    inject ENOSPC), save step 2 and record its StorageError line and what `latest` names."""
    import psutil

    cfg = from_dict(cfg_dict)
    ctx = init_distributed(cfg)
    try:
        policy = build_policy(cfg, ctx)
        batch = batch_from_dict(torch.load(batch_path))
        manager = CheckpointManager(run_dir, config=cfg)
        train_step(policy, batch, cfg, ctx, 1)
        manager.save(1, policy, ctx, {"step": 1})
        children = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        if disk_is_tmpfs:
            fill_until_full(Path(run_dir).parent / "filler", chunk=65536)
        else:
            _inject_enospc_at_the_writer()
        train_step(policy, batch, cfg, ctx, 2)
        try:
            manager.save(2, policy, ctx, {"step": 2})
            error = None
        except StorageError as err:
            error = str(err)
        latest = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
        Path(out_path).write_text(json.dumps({"children": children, "error": error, "latest": latest}))
    finally:
        destroy_distributed()
