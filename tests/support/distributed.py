"""Run a function on N real gloo ranks (spawned processes), the way torchrun would."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args):
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    # Two cores for all ranks: more threads per rank only contend.
    torch.set_num_threads(1)
    fn(*args)


def run_ranks(world_size: int, fn, *args) -> None:
    """Call `fn(*args)` on `world_size` ranks; re-raises the first rank's exception."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
