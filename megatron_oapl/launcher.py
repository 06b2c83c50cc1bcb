"""Start the learner ranks on this machine (what torchrun would do), one process per rank, and stay in
charge of them:

- signals: SIGTERM / SIGUSR1 to `oapl train` reach every rank, which checkpoints at its next step
  boundary and exits (as when a scheduler signals the ranks themselves); Ctrl-C (SIGINT) does the same
  (the ranks ignore the terminal's SIGINT and get SIGTERM from here). A second SIGINT or SIGTERM kills
  the ranks at once (the last checkpoint stays).
- failures: every rank writes its error (time, type, message, traceback) to a report file; when one
  fails, the others get a grace period to fail or finish, then the earliest error that is not a
  consequence of another rank's death (a gloo "Connection closed by peer") is the one reported.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from megatron_oapl.config import check_world_size, to_dict
from megatron_oapl.procs import die_with_parent

log = logging.getLogger(__name__)

# After the first rank failure, how long the others may take to fail (or finish) on their own before
# they are killed: a peer's death reaches a rank blocked in a collective within a second or so.
FAILURE_GRACE_S = 15.0
# Errors a rank gets because another rank died: never the cause of a failure when another error exists.
_PEER_ERRORS = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused",
                "NCCL communicator was aborted", "Socket Timeout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank failed; the message is its error (one line), `user_error` whether the user can fix it."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


# Exceptions that are the user's to fix (config, data, tokenizer, run directory, damaged checkpoints, a
# full disk or missing permissions):
# reported as one `error:` line, exit code 2, no traceback.
_USER_ERRORS = (("megatron_oapl.config", "ConfigError"), ("megatron_oapl.data.prompts", "DataError"),
                ("megatron_oapl.data.tokenizer", "TokenizerError"), ("megatron_oapl.run_lock", "RunLocked"),
                ("megatron_oapl.checkpoint.run_checkpoint", "CheckpointRefused"),
                ("megatron_oapl.disk", "StorageError"))


# Failures whose message says all (what happened, what was kept, what to do): one line, no traceback,
# though not the user's mistake (exit code 1).
_ONE_LINE_ERRORS = (("megatron_oapl.rollout.fleet", "FleetGaveUp"),)


def _is_one_of(err: BaseException, names) -> bool:
    # Only modules already imported can have raised: looking them up costs nothing.
    return isinstance(err, tuple(getattr(sys.modules[mod], name) for mod, name in names if mod in sys.modules))


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, RankFailed):
        return err.user_error
    return _is_one_of(err, _USER_ERRORS)  # (no torch import just to classify an error)


# --------------------------------------------------------------------------------------------------
# Inside a rank
# --------------------------------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, port: int, report_dir: str, fn, args: tuple, launcher_pid: int) -> None:
    # The terminal's Ctrl-C reaches the whole process group: the launcher turns it into a SIGTERM
    # (checkpoint, exit) instead of a KeyboardInterrupt in the middle of a collective. Children of this
    # rank (engines) inherit the ignore.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(launcher_pid)  # and so does whatever this rank forks (Megatron's checkpoint writers)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from megatron_oapl.log_setup import setup_logging

    setup_logging(f"rank {rank}")
    report = Path(report_dir) / f"rank-{rank}.json"
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, which decides what to show
        report.write_text(json.dumps({
            "rank": rank, "time": time.time(), "type": type(err).__name__, "message": str(err),
            "user_error": is_user_error(err), "one_line": _is_one_of(err, _ONE_LINE_ERRORS),
            "traceback": traceback.format_exc()}))
        sys.exit(1)
    # The stop signal the training loop's handler got (its module is loaded if one was installed).
    stop = sys.modules.get("megatron_oapl.checkpoint.stop")
    report.write_text(json.dumps({"rank": rank, "stop_signal": stop and stop.received_stop_signal()}))


def _learner(cfg_dict: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from megatron_oapl.train import train

    train(cfg_dict)


# --------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------


@dataclass
class RunEnd:
    """How the ranks ended without an error of their own: `stop_signal` set if a signal stopped the run
    early (they saved a checkpoint), `killed` if a second one killed them (the last complete one stays)."""

    stop_signal: int | None = None
    killed: bool = False


class _SignalForwarder:
    """While the ranks run: the first SIGTERM / SIGINT / SIGUSR1 goes on to every rank (SIGINT as
    SIGTERM); a second SIGTERM / SIGINT kills them."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.pids: list[int] = []  # the ranks started so far
        self.received: int | None = None
        self.killed = False
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame=None):
        name = signal.Signals(signum).name
        if self.received is not None and signum != signal.SIGUSR1:
            log.warning("%s again: killing the ranks (the last complete checkpoint stays)", name)
            self.killed = True
            self._send(signal.SIGKILL)
            return
        if self.received is None:
            self.received = signum
            log.warning("%s: the ranks save a checkpoint at the end of this step and exit (%s again to kill them at "
                        "once)", name, "Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
        self.forward()

    def forward(self) -> None:
        if self.received is not None:
            self._send(signal.SIGUSR1 if self.received == signal.SIGUSR1 else signal.SIGTERM)

    def _send(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # already gone
                pass


def run_ranks(fn, world_size: int, args: tuple = (), pid_dir: str | Path | None = None) -> RunEnd:
    """Run `fn(*args)` in `world_size` fresh processes (RANK, WORLD_SIZE, MASTER_ADDR/PORT set) until all
    end; `pid_dir/rank-N.pid` name them meanwhile. Raises RankFailed with the failure that came first
    (see the module docstring)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    pid_files = [Path(pid_dir) / f"rank-{rank}.pid" for rank in range(world_size)] if pid_dir else []
    with tempfile.TemporaryDirectory(prefix="oapl-ranks-") as report_dir, _SignalForwarder() as forwarder:
        procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, report_dir, fn, args, os.getpid()),
                             name=f"oapl-rank-{rank}") for rank in range(world_size)]
        # Started with SIGINT ignored, which the ranks inherit (a Ctrl-C while a rank is still importing
        # must not interrupt it either); the forwarder takes SIGINT again right after.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for p in procs:
                p.start()
                forwarder.pids.append(p.pid)
        finally:
            signal.signal(signal.SIGINT, forwarder.handle)
        forwarder.forward()  # a signal that came while starting reaches the late ranks too
        try:
            for path, p in zip(pid_files, procs):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(p.pid))
            _wait(procs)
        finally:
            for path in pid_files:
                path.unlink(missing_ok=True)
            if pid_files and not any(pid_files[0].parent.iterdir()):
                pid_files[0].parent.rmdir()
        reports = {}
        for rank in range(world_size):
            path = Path(report_dir) / f"rank-{rank}.json"
            if path.is_file():
                reports[rank] = json.loads(path.read_text())
    if forwarder.killed:
        return RunEnd(forwarder.received, killed=True)
    failure = _first_failure(procs, reports)
    if failure is not None:
        raise failure
    stops = [r["stop_signal"] for r in reports.values() if r.get("stop_signal")]
    return RunEnd(forwarder.received or (stops[0] if stops else None))


def _wait(procs: list) -> None:
    """Until every rank has exited; after the first failure the rest get FAILURE_GRACE_S, then SIGKILL."""
    from multiprocessing.connection import wait

    deadline = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if not alive:
            return
        if deadline is None and any(p.exitcode not in (None, 0) for p in procs):
            deadline = time.monotonic() + FAILURE_GRACE_S
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if deadline is not None and timeout == 0.0:
            for p in alive:
                p.kill()
            for p in alive:
                p.join()
            return
        wait([p.sentinel for p in alive], timeout=timeout)


def _first_failure(procs: list, reports: dict) -> RankFailed | None:
    """The failure to report: the earliest error that is not a peer's death, else a rank that died with
    no error of its own (a signal: OOM killer, kill -9), else the earliest peer error."""
    errors = sorted((r for r in reports.values() if "type" in r), key=lambda r: r["time"])
    own = [r for r in errors if not any(p in r["message"] for p in _PEER_ERRORS)]
    if own:
        return _rank_failed(own[0], errors)
    silent = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode and rank not in reports]
    if silent:
        rank, code = silent[0]
        how = (f"killed by {signal.Signals(-code).name} without reporting an error (out of memory? see the "
               f"system log)" if code < 0 else f"exited with code {code} before it could report an error (see above)")
        return RankFailed(f"rank {rank} {how}", user_error=False)
    return _rank_failed(errors[0], errors) if errors else None


def _rank_failed(report: dict, errors: list[dict]) -> RankFailed:
    if report["user_error"] or report.get("one_line"):
        return RankFailed(report["message"], user_error=report["user_error"])
    print(report["traceback"], file=sys.stderr, end="")
    others = "; ".join(f"rank {r['rank']}: {r['type']}" for r in errors if r is not report)
    return RankFailed(f"rank {report['rank']} failed: {report['type']}: {report['message']}"
                      + (f" (then {others})" if others else ""), user_error=False)


def world_size_of(cfg) -> int:
    """Learner ranks of a local run: TP x PP x DP, where DP null is the least that holds the experts (EP)."""
    par = cfg.parallel
    dp = par.data_parallel_size or par.expert_model_parallel_size
    size = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * dp
    check_world_size(cfg, size)
    return size


def spawn_learners(cfg) -> RunEnd:
    world = world_size_of(cfg)
    threads = max(1, (os.cpu_count() or 1) // (world + cfg.fleet.num_engines))
    return run_ranks(_learner, world, (to_dict(cfg), threads), pid_dir=Path(cfg.run_dir) / "ranks")
