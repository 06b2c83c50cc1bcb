"""Start the learner ranks on this machine (what torchrun would do), one process per rank."""

from __future__ import annotations

import os
import socket

from megatron_oapl.config import check_world_size, to_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: end this process when its parent dies, so killing `oapl train` never leaves orphaned
    ranks or engines holding ports and cores (a no-op elsewhere)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_entry(rank: int, world_size: int, port: int, cfg_dict: dict, threads: int) -> None:
    import torch

    die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    from megatron_oapl.train import train

    train(cfg_dict)


def world_size_of(cfg) -> int:
    par = cfg.parallel
    size = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * (par.data_parallel_size or 1)
    check_world_size(cfg, size)
    return size


def spawn_learners(cfg) -> None:
    import torch.multiprocessing as mp

    world = world_size_of(cfg)
    threads = max(1, (os.cpu_count() or 1) // (world + cfg.fleet.num_engines))
    mp.spawn(_rank_entry, args=(world, _free_port(), to_dict(cfg), threads), nprocs=world, join=True)
