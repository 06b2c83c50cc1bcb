"""One `oapl train` per run directory: an exclusive lock on RUN_DIR/.lock for the life of the run.

    with RunLock(cfg.run_dir):       # RunLocked if another live process holds it
        ...

Two runs on one directory would resume from each other's live checkpoints and write the same
`tmp-step_N`. The lock is `flock` on the file: the kernel drops it when its holder exits, however it
exits (SIGKILL, OOM), so a lock left by a dead run is simply taken over; the file's content (pid, host,
start time, command) only says who holds it. A filesystem without locks (some network filesystems
mounted without them) gets a warning and no protection.

A flock belongs to the open file, which a forked child shares: a process forked by the run (a reward's
daemon, a library's helper) would keep the directory locked after the run ended. So the descriptor is
closed in every child forked from Python, and a lock still held while the file names a process of this
host that is gone (or names nobody: its holder released it) is held by such a leftover alone: the file
is replaced (under a lock on the directory, so two runs never both take over) and the new one locked.
A run directory where the lock cannot be written (full disk, permissions) is a `StorageError` (one
line), and leaves no empty lock file behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from megatron_oapl.disk import StorageError

log = logging.getLogger("oapl.run_lock")

LOCK_FILE = ".lock"
# How long a locked file with no holder written in it may be someone's acquisition in progress
# (flock, then the write: microseconds apart) before it counts as a leftover's.
_EMPTY_GRACE_S = 1.0
_held_fds: set[int] = set()  # closed in forked children (see the module docstring)


def _close_held_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {when}: {holder.get('command', '?')})"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder_gone(holder: dict) -> bool:
    """Whether the recorded holder is a process of this host that no longer runs (then whoever keeps the
    flock is a leftover it forked). A holder on another host cannot be checked: never gone."""
    pid = holder.get("pid")
    if not holder:
        return True
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError.from_os_error(err, f"creating run_dir={str(self.path.parent)!r}", self.path.parent) from None
        for _ in range(3):  # a retry only follows a takeover of a leftover's lock (or a race with one)
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    log.warning("cannot lock %s (%s): this filesystem has no file locks, so a second `oapl train` "
                                "on this run_dir would not be refused", self.path, err)
                    return self
                holder = self._holder_after_grace(fd)
                os.close(fd)
                if not _holder_gone(holder):
                    raise RunLocked(f"run_dir={str(self.path.parent)!r} is in use by {_describe(holder)}; wait for "
                                    "that run to end or stop it, or choose another run_dir") from None
                self._replace_leftover()
                continue
            if not self._is_current(fd):  # the file was replaced (a takeover) while we opened it
                os.close(fd)
                continue
            self._take(fd)
            return self
        raise RunLocked(f"run_dir={str(self.path.parent)!r}: its lock {self.path} keeps changing hands; try again")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StorageError.from_os_error(err, "creating the run lock", self.path) from None

    def _is_current(self, fd: int) -> bool:
        try:
            on_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_path.st_dev, on_path.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _holder_after_grace(fd: int) -> dict:
        """The recorded holder; an empty file is re-read for a moment (its holder may be writing it)."""
        deadline = time.monotonic() + _EMPTY_GRACE_S
        holder = _read_holder(fd)
        while not holder and time.monotonic() < deadline:
            time.sleep(0.05)
            holder = _read_holder(fd)
        return holder

    def _replace_leftover(self) -> None:
        """The lock is held, but not by the run the file names (it is gone): a process it forked keeps the
        flock. Unlink the file (under a lock on the directory, re-checking first, so that two runs taking
        over never unlink each other's fresh lock); the next attempt creates and locks a new one."""
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # free now: the next attempt takes it the normal way
            except OSError:
                holder = _read_holder(fd)
                if _holder_gone(holder):
                    log.warning("%s is locked by a process left behind by %s, which is no longer running: "
                                "replacing the lock file", self.path, _describe(holder) if holder else "a finished run")
                    os.unlink(self.path)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _take(self, fd: int) -> None:
        previous = _read_holder(fd)
        if previous:  # its holder is gone (the kernel released its lock): take the directory over
            log.info("taking over %s from %s, which is no longer running", self.path, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        data = json.dumps(me).encode()
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        except OSError as err:  # full disk, quota: no empty lock file stays behind
            os.unlink(self.path)
            os.close(fd)
            raise StorageError.from_os_error(err, f"writing the run lock of run_dir={str(self.path.parent)!r}",
                                             self.path) from None
        self._fd = fd
        _held_fds.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            # Unlinked before the close: whoever opened it meanwhile sees it is no longer the current file.
            if self._is_current(self._fd):
                self.path.unlink(missing_ok=True)
            _held_fds.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
