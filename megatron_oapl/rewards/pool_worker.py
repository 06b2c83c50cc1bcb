"""One reward worker process of `RewardPool`: scores one call at a time, sent over a socket it inherited.

    python -m megatron_oapl.rewards.pool_worker FD PARENT_PID REWARD_NAME    # started by RewardPool only

Protocol (pickled tuples over `multiprocessing.connection.Connection(FD)`; stdin/stdout stay the
reward's own, since a reward may print):
    pool -> worker   ("init", sys_path, settings)          once, first ({field: reward name}, binarize,
                                                           code_sandbox)
    worker -> pool   ("ready",) | ("load_error", message)  every reward is imported (or one cannot be)
    pool -> worker   (call_id, text, prompt, reward name)  one call at a time
    worker -> pool   (call_id, value, error)               error None: value is the validated score
The pool closes the socket (EOF: exit) or kills the worker's process group (timeout, close).

The reward runs in the main thread (so `signal.alarm`-based library timeouts work here). After every call
the worker kills whatever the reward started: it is a child subreaper, so even a process that
double-forked and left the session is re-parented here and found among its descendants.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from megatron_oapl.procs import die_with_parent

_PR_SET_CHILD_SUBREAPER = 36
ERROR_CHARS = 500  # an error message longer than this is cut: it travels per call and may be logged


def _become_subreaper() -> None:
    """Linux: orphaned descendants re-parent to this process instead of init, so it can find and kill them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_descendants(grace_s: float = 2.0) -> None:
    """SIGKILL every descendant of this process and reap them, so none outlives the call that started it."""
    import psutil

    deadline = time.monotonic() + grace_s
    # As a subreaper this process is an ancestor of every descendant, so "no child at all" (one syscall)
    # means nothing is left; the /proc scan (milliseconds on a busy node) runs only when a call forked.
    while _reap_children():
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.Error:
                pass
        # Killed processes' own children re-parent to us and are found on the next pass.
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _reap_children() -> bool:
    """Reap exited children (psutil counts a zombie as existing); whether any child is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."


def _error_text(err: BaseException) -> str:
    return _cut(f"{type(err).__name__}: {err}")


def build_reward(cfg_rewards: Any) -> Callable[..., float]:
    """The reward `cfg_rewards.name` names, set up by the rest of the section (`code`: its sandbox,
    `rewards.code_sandbox`; a ValueError naming that field when the sandbox cannot run here)."""
    # Here, not in the registry: `code` registers itself there, so the registry importing it would be a circle.
    if cfg_rewards.name == "code":
        from megatron_oapl.rewards.code import build_code_reward

        return build_code_reward(cfg_rewards)
    from megatron_oapl.rewards.registry import get_reward

    return get_reward(cfg_rewards.name)


def serve(conn: Connection) -> None:
    from types import SimpleNamespace

    from megatron_oapl.rewards.registry import InvalidScore, validate_score

    try:
        _, sys_path, settings = conn.recv()
    except (EOFError, OSError):  # the pool went away before we started
        return
    # The engine may have extended sys.path (a test runner, a user's launcher): dotted-path rewards must
    # import here exactly as they would there.
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    fns = {}
    for where, name in settings["rewards"].items():
        try:
            if name not in fns:
                fns[name] = build_reward(SimpleNamespace(name=name, binarize=settings["binarize"],
                                                         code_sandbox=settings["code_sandbox"]))
        except BaseException as err:  # noqa: BLE001 - reported to the pool, which raises it to the user
            # get_reward's own errors name rewards.name: say which field named this one.
            why = (str(err).replace("rewards.name=", f"{where}=", 1) if isinstance(err, ValueError) else
                   f"{where}={name!r} could not be loaded: {_error_text(err)}")
            conn.send(("load_error", why))
            return
    try:
        conn.send(("ready",))
    except OSError:
        return
    while True:
        try:
            call_id, text, prompt, reward = conn.recv()
        except (EOFError, OSError):  # the pool closed: no more calls
            return
        try:
            value, error = validate_score(fns[reward](text, prompt), settings["binarize"]), None
        except InvalidScore as err:
            value, error = 0.0, _cut(str(err))
        except BaseException as err:  # noqa: BLE001 - anything the reward does is its own problem
            value, error = 0.0, _error_text(err)
        kill_descendants()
        try:
            conn.send((call_id, value, error))
        except OSError:
            return


def main(argv: list[str]) -> None:
    fd, parent_pid = int(argv[0]), int(argv[1])  # argv[2], rewards.name, is there for `ps` only
    # Die with the engine even when it is SIGKILLed (a parent that died before prctl: exit at once).
    die_with_parent(parent_pid)
    _become_subreaper()
    serve(Connection(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
