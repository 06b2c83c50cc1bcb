"""The save-by deadline (`oapl launch slurm --save-by`, exported as OAPL_SAVE_BY_EPOCH) is a stop request:
the loop's step-boundary checks (`bool(stop)` while waiting for rollouts, `stop.agreed()` after a step)
see it like a signal, and on real gloo ranks one rank past the deadline stops them all."""

from __future__ import annotations

import signal
import time

import pytest

from megatron_oapl.checkpoint.stop import StopRequest, install_signal_handlers, save_by_deadline
from tests.support.distributed import run_ranks


def test_deadline_in_the_past_requests_a_stop():
    stop = StopRequest(deadline=time.time() - 1.0)
    assert stop and stop.agreed() and stop.requested
    assert stop.reason == "the OAPL_SAVE_BY_EPOCH deadline"


def test_deadline_in_the_future_or_none_does_not():
    for stop in (StopRequest(deadline=time.time() + 3600.0), StopRequest()):
        assert not stop and not stop.agreed() and not stop.requested


def test_signal_handlers_read_the_deadline_from_the_environment(monkeypatch):
    monkeypatch.setenv("OAPL_SAVE_BY_EPOCH", "1000")  # 1970: long past
    stop = install_signal_handlers((signal.SIGUSR1,))
    try:
        assert stop.deadline == 1000.0 and stop.agreed()
    finally:
        stop.restore()
    monkeypatch.delenv("OAPL_SAVE_BY_EPOCH")
    stop = install_signal_handlers((signal.SIGUSR1,))
    try:
        assert stop.deadline is None and not stop
    finally:
        stop.restore()


def test_a_bad_deadline_names_the_variable():
    assert save_by_deadline({"OAPL_SAVE_BY_EPOCH": " 1700000000 "}) == 1700000000.0
    assert save_by_deadline({}) is None and save_by_deadline({"OAPL_SAVE_BY_EPOCH": ""}) is None
    with pytest.raises(ValueError, match=r"OAPL_SAVE_BY_EPOCH='soon' must be a Unix time in seconds"):
        save_by_deadline({"OAPL_SAVE_BY_EPOCH": "soon"})


def _one_rank_past_deadline() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        # Rank 1's clock (or its copy of the variable) says the deadline has passed; rank 0's does not.
        stop = StopRequest(deadline=time.time() + (3600.0 if rank == 0 else -1.0))
        assert stop.agreed(), f"rank {rank} did not agree to stop"
        assert bool(stop) == (rank == 1)  # rank 0 stops because rank 1 asked, not by its own deadline
    finally:
        dist.destroy_process_group()


def test_ranks_agree_when_one_is_past_the_deadline():
    run_ranks(2, _one_rank_past_deadline)
