"""RUN_DIR/.lock: a live holder (another process) is refused by name; a killed holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from megatron_oapl.run_lock import RunLock, RunLocked

HOLD = ("import sys; from megatron_oapl.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.read()")


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_pid_and_host(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"run_dir={str(tmp_path)!r} is in use by pid {holder.pid} on {os.uname().nodename}" in message
    finally:
        holder.communicate("", timeout=30)  # stdin closed: the holder exits and releases
    with RunLock(tmp_path):  # released with its holder
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the file still names it
    holder.wait(timeout=30)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.INFO, logger="oapl.run_lock"), RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over {tmp_path / '.lock'} from pid {holder.pid}" in caplog.text
