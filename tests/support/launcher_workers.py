"""Rank bodies for tests/unit/test_launcher.py, run by `megatron_oapl.launcher.run_ranks` (RANK,
WORLD_SIZE, MASTER_ADDR/PORT set). Only the first uses gloo: importing torch in every rank of every
test would cost seconds each."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def real_error_after_the_peer_error(marker: str) -> None:
    """Rank 0 leaves the gloo group, so rank 1 (blocked in an all-reduce) fails with gloo's peer error
    and exits first; only then does rank 0 raise the error that caused it all."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        dist.destroy_process_group()
        _wait_for(Path(marker))
        raise ValueError("the real problem, on rank 0")
    try:
        dist.all_reduce(torch.ones(1))
    finally:
        Path(marker).touch()


def user_error_on_rank_0() -> None:
    if os.environ["RANK"] == "0":
        from megatron_oapl.data.prompts import DataError

        raise DataError("train.jsonl:3: 'prompt' must be a string, got int")


def rank_1_killed() -> None:
    """Rank 1 dies without a word, as under the OOM killer."""
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)


def record_stop_signal(out_dir: str) -> None:
    """Like the training loop: run until a stop signal (SIGTERM / SIGUSR1), then record which one came."""
    got = []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda s, f: got.append(s))
    Path(out_dir, f"ready-{os.environ['RANK']}").touch()
    while not got:
        time.sleep(0.05)
    Path(out_dir, f"stopped-{os.environ['RANK']}").write_text(str(got[0]))


def never_stop(out_dir: str) -> None:
    """A rank stuck where no step boundary comes (a hung collective): the stop signal changes nothing."""
    signal.signal(signal.SIGTERM, lambda s, f: None)
    Path(out_dir, f"ready-{os.environ['RANK']}").touch()
    while True:
        time.sleep(0.05)
