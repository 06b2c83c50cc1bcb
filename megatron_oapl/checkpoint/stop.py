"""Stop at a step boundary: a signal (SLURM's pre-timeout signal, a preemption's SIGTERM) or the
`--save-by` deadline asks the training loop to save a checkpoint and exit instead of killing the process.

    stop = install_signal_handlers()       # each rank, main thread
    ...
    if stop.agreed(group):                 # at a step boundary: the same answer on every rank
        save(); exit
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger("oapl.checkpoint")

# Unix time (seconds) by which a run should checkpoint and stop; `oapl launch slurm --save-by` exports it.
SAVE_BY_ENV = "OAPL_SAVE_BY_EPOCH"


def save_by_deadline(environ=os.environ) -> float | None:
    """The OAPL_SAVE_BY_EPOCH deadline of this process's environment, or None."""
    text = environ.get(SAVE_BY_ENV, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{SAVE_BY_ENV}={text!r} must be a Unix time in seconds "
                         "(`oapl launch slurm --save-by MINUTES` sets it)") from None


@dataclass
class StopRequest:
    """Set by a signal handler, or due once `deadline` (Unix seconds) has passed; the training loop checks
    it at step boundaries, saves and exits. The deadline is how a job whose signals may not arrive (some
    container runtimes) still stops in time: checked at the same step boundaries as a signal."""

    requested: bool = False
    signum: int | None = None
    deadline: float | None = None
    _previous: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        if not self.requested and self.deadline is not None and time.time() >= self.deadline:
            log.warning("%s=%.0f has passed: will save a checkpoint at the end of this step and exit",
                        SAVE_BY_ENV, self.deadline)
            self.requested = True
        return self.requested

    @property
    def reason(self) -> str:
        """What asked for the stop, for log lines: the signal's name or the deadline."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return f"the {SAVE_BY_ENV} deadline" if self.requested else "nothing"

    def agreed(self, group=None) -> bool:
        """Collective: True on every rank if any rank was signalled or is past the deadline (schedulers may
        signal only some ranks, node clocks differ, and all ranks must take the same save-and-exit branch)."""
        if not (dist.is_available() and dist.is_initialized()):
            return bool(self)
        flag = torch.tensor([1 if self else 0], dtype=torch.int32)
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


_received: list[int] = []  # stop signals this process received (through any StopRequest's handler)


def received_stop_signal() -> int | None:
    """The first stop signal this process received, or None: lets a launcher tell a run that was stopped
    (checkpointed, resumable) from one that ran to its end."""
    return _received[0] if _received else None


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)) -> StopRequest:
    """Make `signals` (SLURM's pre-timeout signal, a preemption's SIGTERM) set `.requested` instead of
    killing the process; the request also comes due at the environment's OAPL_SAVE_BY_EPOCH, if set.
    Call from the main thread of each rank."""
    stop = StopRequest(deadline=save_by_deadline())

    def handler(signum, frame):
        if not stop.requested:
            log.warning("received %s: will save a checkpoint at the end of this step and exit",
                        signal.Signals(signum).name)
        stop.requested, stop.signum = True, signum
        _received.append(signum)

    for signum in signals:
        stop._previous[signum] = signal.signal(signum, handler)
    return stop
