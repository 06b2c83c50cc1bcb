"""One `oapl train` per run directory: an exclusive lock on RUN_DIR/.lock for the life of the run.

    with RunLock(cfg.run_dir):       # RunLocked if another live process holds it
        ...

Two runs on one directory would resume from each other's live checkpoints and write the same
`tmp-step_N`. The lock is `flock` on the file: the kernel drops it when its holder exits, however it
exits (SIGKILL, OOM), so a lock left by a dead run is simply taken over; the file's content (pid, host,
start time, command) only says who holds it. A filesystem without locks (some network filesystems
mounted without them) gets a warning and no protection.
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

log = logging.getLogger("oapl.run_lock")

LOCK_FILE = ".lock"


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


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                os.close(fd)
                log.warning("cannot lock %s (%s): this filesystem has no file locks, so a second `oapl train` "
                            "on this run_dir would not be refused", self.path, err)
                return self
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"run_dir={str(self.path.parent)!r} is in use by {_describe(holder)}; wait for that "
                            "run to end or stop it, or choose another run_dir") from None
        previous = _read_holder(fd)
        if previous:  # its holder is gone (the kernel released its lock): take the directory over
            log.info("taking over %s from %s, which is no longer running", self.path, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it (the file stays, others may be opening it)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
