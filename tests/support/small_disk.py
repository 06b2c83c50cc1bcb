"""A disk that fills up: a small tmpfs where the test may mount one (root on Linux), else an injected ENOSPC.

    def test_x(small_disk):            # from tests.support.small_disk import small_disk
        run_dir = small_disk.fill()    # an empty directory on a full filesystem
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


class SmallDisk:
    def __init__(self, root: Path, mounted: bool, monkeypatch):
        self.root, self.mounted, self._monkeypatch = root, mounted, monkeypatch

    def fill(self, keep_free: int = 0) -> Path:
        """A fresh directory `run` on this disk, then the disk filled up to `keep_free` bytes. Without a
        tmpfs, every os.pwrite / os.write in this process fails with ENOSPC instead (nothing else can)."""
        run_dir = self.root / "run"
        run_dir.mkdir()
        if not self.mounted:
            self._inject_enospc()
            return run_dir
        fill_until_full(self.root / "filler")
        if keep_free:
            os.truncate(self.root / "filler", max(0, os.path.getsize(self.root / "filler") - keep_free))
        return run_dir

    def _inject_enospc(self) -> None:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self._monkeypatch.setattr(os, "pwrite", full)
        self._monkeypatch.setattr(os, "write", full)


def fill_until_full(filler: Path, chunk: int = 4096) -> None:
    """Append zeros to `filler` until its filesystem refuses with ENOSPC."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * chunk)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def _try_mount(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    root = tmp_path / "disk"
    mounted = _try_mount(root, "4m")
    try:
        yield SmallDisk(root, mounted, monkeypatch)
    finally:
        monkeypatch.undo()
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)
