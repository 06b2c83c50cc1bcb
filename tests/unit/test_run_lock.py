"""RUN_DIR/.lock: a live holder (another process) is refused by name; a killed holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_oapl.run_lock import RunLock, RunLocked
from tests.support.small_disk import small_disk  # noqa: F401 - a fixture

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


# A holder that forks a child which outlives it (a reward's daemon, a library's helper), then exits.
FORK_AND_EXIT = ("import os, sys, time; from megatron_oapl.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
                 "pid = os.fork()\n"
                 "if pid == 0: time.sleep(60); os._exit(0)\n"
                 "print(pid, flush=True); os._exit(0)")


def test_a_child_forked_by_the_run_does_not_keep_its_directory_locked(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_EXIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())  # (the child keeps the pipe open: no waiting for its end)
    assert holder.wait(timeout=60) == 0
    try:
        assert Path(f"/proc/{child}").exists()  # the forked child still runs
        with RunLock(tmp_path):  # before: RunLocked "in use by pid ? on ?", held by the child
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


# A holder whose lock descriptor reaches a child it did not fork from Python (inherited through exec, as
# a C library's fork would leave it), then is killed: the child alone keeps the flock.
PASS_FD_AND_WAIT = ("import subprocess, sys; from megatron_oapl.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=(lock._fd,)); "
                    "print(child.pid, flush=True); sys.stdin.read()")


def test_a_lock_kept_by_a_leftover_of_a_dead_run_is_replaced(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", PASS_FD_AND_WAIT, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with caplog.at_level(logging.WARNING, logger="oapl.run_lock"), RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
            second = subprocess.run([sys.executable, "-c", "import sys; from megatron_oapl.run_lock import RunLock; "
                                     "RunLock(sys.argv[1]).acquire()", str(tmp_path)], capture_output=True, text=True,
                                    timeout=60)
            assert f"RunLocked: run_dir={str(tmp_path)!r} is in use by pid {os.getpid()}" in second.stderr  # protected again
        assert f"locked by a process left behind by pid {holder.pid}" in caplog.text
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_full_disk_at_start_is_one_line_and_leaves_no_lock_file(small_disk):
    from megatron_oapl.disk import StorageError

    run_dir = small_disk.fill()
    with pytest.raises(StorageError) as failed:
        RunLock(run_dir).acquire()
    assert str(failed.value).startswith(f"writing the run lock of run_dir={str(run_dir)!r} failed: "
                                        f"no space left on device at {run_dir / '.lock'}")
    assert not (run_dir / ".lock").exists()
