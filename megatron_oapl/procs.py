"""Process lifetime shared by every process the project starts (learner ranks, engines, reward workers).

Linux ends a process whose parent died only when the process asked for it (PR_SET_PDEATHSIG), and the
request is not inherited by forked children. So:

- `die_with_parent()` in every process we start (ranks, engines, reward workers): it is SIGKILLed when
  its parent dies, however the parent died (SIGKILL, OOM), and so are the children it forks from Python;
- `forked_children_die_with_this_process()` in `oapl train` itself, whose own parent (a shell, a
  scheduler) it must outlive: what a library or a reward forks there dies with it.

Processes that libraries start with `spawn` (a fresh interpreter) cannot be reached this way: the
project avoids them (see `checkpoint/megatron_compat.py` for Megatron's checkpoint writer) or lets the
library tie them (vLLM's worker processes watch a death pipe). Everything here is a no-op off Linux.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_fork_hook_installed = False
_parent_at_fork = [0]  # the forking process's pid, for its child's check


def _set_parent_death_signal(parent_pid: int) -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before prctl took effect: then no signal would ever come.
    if os.getppid() != parent_pid:
        os._exit(1)


def _remember_parent() -> None:
    _parent_at_fork[0] = os.getpid()


def _tie_forked_child() -> None:
    # Runs in the child right after os.fork(). PR_SET_PDEATHSIG follows the *thread* that forked: a child
    # forked by a short-lived thread ends with that thread, which suits the run (nothing it starts should
    # outlive the work that started it).
    _set_parent_death_signal(_parent_at_fork[0])


def forked_children_die_with_this_process() -> None:
    """Linux: every child this process forks from Python from now on (multiprocessing's fork context,
    os.fork in a library or a reward) is SIGKILLed when this process dies."""
    global _fork_hook_installed
    if sys.platform.startswith("linux") and not _fork_hook_installed:
        _fork_hook_installed = True
        os.register_at_fork(before=_remember_parent, after_in_child=_tie_forked_child)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: end this process when its parent dies, so killing `oapl train` never leaves orphaned ranks,
    engines or reward workers holding ports and cores; and so do the children it forks (a no-op elsewhere).
    `parent_pid`: the parent that started us, if known (this process exits at once if it is gone already)."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(os.getppid() if parent_pid is None else parent_pid)
        forked_children_die_with_this_process()
