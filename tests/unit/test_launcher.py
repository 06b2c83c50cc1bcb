"""The local launcher (`megatron_oapl.launcher.run_ranks`) on real spawned gloo ranks: which failure it
reports when several ranks fail, and what a signal to the launcher does to the ranks."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from megatron_oapl.launcher import RankFailed, run_ranks
from tests.support import launcher_workers as workers


def test_the_real_error_is_reported_not_the_peer_error_that_came_first(tmp_path):
    # torch's mp.spawn reported whichever failed rank exited first: here rank 1's "Connection closed by peer".
    with pytest.raises(RankFailed) as failed:
        run_ranks(workers.real_error_after_the_peer_error, 2, (str(tmp_path / "rank1-failed"),))
    message = str(failed.value)
    assert message.startswith("rank 0 failed: ValueError: the real problem, on rank 0"), message
    assert "then rank 1:" in message and not failed.value.user_error


def test_a_user_error_in_a_rank_is_one_line_and_marked_as_such():
    with pytest.raises(RankFailed) as failed:
        run_ranks(workers.user_error_on_rank_0, 2)
    assert str(failed.value) == "train.jsonl:3: 'prompt' must be a string, got int"
    assert failed.value.user_error


def test_a_rank_that_dies_silently_is_named():
    with pytest.raises(RankFailed) as failed:
        run_ranks(workers.rank_1_killed, 2)
    assert str(failed.value).startswith("rank 1 killed by SIGKILL without reporting an error"), str(failed.value)


def _interrupt_when_ready(tmp_path, times: int) -> None:
    """Ctrl-C to this process (the launcher) once both ranks run, `times` times (0.5 s apart)."""
    def interrupt():
        while len(list(tmp_path.glob("ready-*"))) < 2:
            time.sleep(0.05)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)

    threading.Thread(target=interrupt, daemon=True).start()


def test_ctrl_c_to_the_launcher_stops_every_rank_with_sigterm(tmp_path):
    """SIGINT to the launcher becomes SIGTERM to the ranks (the training loop checkpoints on it; a SIGINT
    would be a KeyboardInterrupt mid-collective), and the run's end names the signal the launcher got."""
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when pytest runs in the background
    _interrupt_when_ready(tmp_path, 1)
    end = run_ranks(workers.record_stop_signal, 2, (str(tmp_path),), pid_dir=tmp_path / "ranks")
    assert end.stop_signal == signal.SIGINT
    assert [(tmp_path / f"stopped-{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2
    assert not (tmp_path / "ranks").exists()  # the pid files went with the ranks
    assert signal.getsignal(signal.SIGINT) is before  # the launcher's handler is gone


def test_a_second_ctrl_c_kills_ranks_that_do_not_stop(tmp_path):
    _interrupt_when_ready(tmp_path, 2)
    end = run_ranks(workers.never_stop, 2, (str(tmp_path),))
    assert end.killed and end.stop_signal == signal.SIGINT  # returned: both ranks are gone
