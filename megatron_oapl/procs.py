"""Process hygiene shared by every process the project starts (learner ranks, engines, reward workers)."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """Linux: end this process when its parent dies, so killing `oapl train` never leaves orphaned
    ranks, engines or reward workers holding ports and cores (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
