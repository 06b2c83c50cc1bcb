"""Storage failures the operator has to fix (a full disk, a quota, permissions, a read-only mount), as one
line that names the cause and the path instead of a library's traceback.

    raise StorageError.from_os_error(err, "writing checkpoint step_8", path, needed_bytes=...)

`StorageError` is a user error for `oapl` (one `error:` line, exit code 2). `storage_cause` finds the
OSError behind an exception that a library wrapped (Megatron's `CheckpointException`, a worker's
re-raised error), following `__cause__` / `__context__`, torch's per-rank failure maps and an
`[Errno N]` in a message.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

# The errors that are about the storage, not the program, and what to tell the operator.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class StorageError(RuntimeError):
    """A write failed for a reason the operator fixes (space, quota, permissions); one line."""

    @classmethod
    def from_os_error(cls, err: OSError, action: str, path: str | os.PathLike,
                      needed_bytes: int | None = None) -> "StorageError":
        where = err.filename or path
        text = f"{action} failed: {_CAUSES.get(err.errno, err.strerror or str(err))} at {where}"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            text += f" ({_space(path, needed_bytes)})"
        return cls(text)


def _space(path: str | os.PathLike, needed_bytes: int | None) -> str:
    free = free_bytes(path)
    parts = [] if free is None else [f"{_size(free)} free"]
    if needed_bytes:
        parts.append(f"about {_size(needed_bytes)} needed")
    return ", ".join(parts) or "free space unknown"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# An OSError's text inside another exception's message: what is left of it once an exception crossed a
# process (a pickled exception loses its __cause__; Megatron's writers send theirs through queues).
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\]]+)(?::\s*'([^']*)')?")


def _named_in_text(text: str) -> OSError | None:
    for match in _ERRNO_TEXT.finditer(text):
        if int(match.group(1)) in _CAUSES:
            return OSError(int(match.group(1)), match.group(2).strip(), match.group(3))
    return None


def storage_cause(err: BaseException | None) -> OSError | None:
    """The storage OSError (see _CAUSES) behind `err`, however a library wrapped it, or None."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if not isinstance(e, BaseException):
            continue
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return e
        named = _named_in_text(str(e))
        if named is not None:
            return named
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException:
        if isinstance(failures, dict):  # {rank: (exception, stack summary)}
            stack += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
    return None
