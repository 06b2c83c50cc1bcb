"""`RewardPool`: rewards scored in worker processes beside an engine's sampling loop.

    with RewardPool(cfg.rewards, cfg.rewards.num_workers) as pool:  # ValueError naming rewards.name if bad
        pool.submit(key, sample.text, prompt)      # never waits for a worker: queued FIFO until one is free
        for result in pool.poll(timeout_s=0.0):    # RewardResult(key, value, error, timed_out), any order
            ...
        pool.pending(), pool.stats()               # {"calls": ..., "errors": ..., "timeouts": ...}

Why processes and not threads (the package's former `RewardScorer`): a thread cannot be killed, so a hung
reward held its thread and whatever it started forever, and timeouts ran one after another. Here:
- each worker (`pool_worker.py`) runs one call at a time; the pool's own thread dispatches calls, receives
  results and watches deadlines, so scoring advances while the engine is busy sampling;
- a call past `timeout_s` scores 0 (`timed_out`), its worker's whole process group is SIGKILLed and a
  fresh worker started: N hung calls on N workers cost one timeout, not N;
- after every call the worker kills what the reward started; on timeout and at `close` the process-group
  kill (plus the descendants the pool can still see) covers the rest;
- a worker that dies mid-call (a segfault, `os._exit`) makes that call an error and is replaced;
- what counts as a score is `registry.validate_score`.

Workers are started with `subprocess` (the engine is a daemonic multiprocessing process, which may not
have multiprocessing children), each in a session of its own, talking over a socket passed by fd (the
reward keeps stdin/stdout). They die with the pool's thread (PR_SET_PDEATHSIG), so a killed engine leaves
no workers behind; only what a call in flight at that moment had started outlives it (orphaned, as
nothing of the pool is left to kill it).

Rewards are looked up by name in each worker: a registered built-in or a dotted path, never a function
registered at run time in the engine process only. A pool holds every reward of the run (`reward_fields`:
rewards.name, and an eval set's own `reward`); each call names the one that scores it (`split_reward`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron_oapl.rollout.types import Prompt

__all__ = ["RewardPool", "RewardResult", "reward_fields", "split_reward"]

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    key: Any  # what `submit` was given
    value: float  # the (validated, binarized if configured) score; 0.0 on error or timeout
    error: str | None = None  # why the call failed (counted in `errors`); None when scored or timed out
    timed_out: bool = False  # the call ran past `timeout_s` (counted in `timeouts`, not in `errors`)


def reward_fields(cfg) -> dict[str, str]:
    """Every reward a run scores with, by the config field naming it: rewards.name first, then each eval set's
    own `reward` (eval.sets.<set>.reward)."""
    fields = {"rewards.name": cfg.rewards.name}
    for name, spec in (cfg.eval.sets or {}).items():
        if spec.get("reward"):
            fields[f"eval.sets.{name}.reward"] = spec["reward"]
    return fields


def split_reward(cfg, split: str) -> str:
    """The reward that scores an order of `split`: its eval set's own checker, else rewards.name."""
    if split.startswith("eval/"):
        return cfg.eval.sets[split.removeprefix("eval/")].get("reward") or cfg.rewards.name
    return cfg.rewards.name


@dataclass
class _Call:
    key: Any
    text: str
    prompt: Prompt
    reward: str  # which of the pool's rewards scores it


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    deadline: float  # start-up deadline until ready, then the running call's; inf when idle
    ready: bool = False
    call: _Call | None = None


class RewardPool:
    """`num_workers` reward worker processes fed from one FIFO queue; see the module docstring."""

    LOG_FIRST = 5  # errors and timeouts logged with their message; later ones are only counted
    START_TIMEOUT_S = 120.0  # a worker importing its reward (reasoning-gym takes seconds) must be ready by then
    MAX_START_FAILURES = 3  # consecutive failed worker starts before the pool gives up (poll raises)
    WATCH_S = 1.0  # the pool thread checks worker exit codes at least this often (a lost EOF cannot hide a death)

    def __init__(self, cfg_rewards: Any, num_workers: int, fields: dict[str, str] | None = None):
        """cfg_rewards: a `RewardsConfig` (name, binarize, timeout_s); fields: every reward the pool serves,
        by the config field naming it (`reward_fields`; default rewards.name alone). Returns once every worker
        has imported them; raises ValueError (naming the field) when one cannot be loaded."""
        if int(num_workers) < 1:
            raise ValueError(f"rewards.num_workers={num_workers} must be >= 1")
        self.name: str = cfg_rewards.name
        self.binarize: bool = bool(cfg_rewards.binarize)
        # What a worker needs to build the reward (`pool_worker.build_reward`): plain values, pickled to it.
        self.settings = {"rewards": fields or {"rewards.name": cfg_rewards.name}, "binarize": self.binarize,
                         "code_sandbox": getattr(cfg_rewards, "code_sandbox", "bwrap")}
        self.timeout_s: float = float(cfg_rewards.timeout_s)
        self.num_workers = int(num_workers)
        self._cond = threading.Condition()  # guards everything below it and wakes `poll`
        self._queue: deque[_Call] = deque()
        self._results: list[RewardResult] = []
        self._pending = 0
        self._counts = {"calls": 0, "errors": 0, "timeouts": 0}
        self._closing = False
        self._failure: str | None = None  # why the pool thread stopped, if not closed
        self._load_error: str | None = None  # the reward could not be imported at start-up
        self._workers: list[_Worker] = []  # owned by the pool thread
        self._start_failures = 0
        self._started = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # The pool thread starts the workers: PR_SET_PDEATHSIG follows the thread that forked them, so they
        # live exactly as long as this thread (i.e. until `close` or the engine's death).
        self._thread = threading.Thread(target=self._run, name=f"reward-pool-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._load_error is not None or self._failure is not None:
            self.close()
            if self._load_error is not None:
                raise ValueError(self._load_error)
            raise RuntimeError(f"reward workers for rewards.name={self.name!r} could not start: {self._failure}")

    # --- the caller's side -------------------------------------------------------------------------------

    def submit(self, key: Any, text: str, prompt: Prompt, reward: str | None = None) -> None:
        """Queue one completion for scoring by `reward` (one of the pool's; default rewards.name); returns at
        once (a free worker picks it up in FIFO order)."""
        reward = self.name if reward is None else reward
        if reward not in self.settings["rewards"].values():
            raise ValueError(f"reward {reward!r} is not one of this pool's: {sorted(set(self.settings['rewards'].values()))}")
        with self._cond:
            self._raise_if_stopped()
            self._queue.append(_Call(key, text, prompt, reward))
            self._pending += 1
        self._wake()

    def poll(self, timeout_s: float = 0.0) -> list[RewardResult]:
        """Results finished since the last poll, in any order; if none is ready and calls are pending, waits
        up to timeout_s for at least one. Raises RuntimeError if the workers could not be kept running."""
        with self._cond:
            if not self._results and self._pending and timeout_s > 0:
                self._cond.wait_for(lambda: self._results or self._failure or self._closing, timeout_s)
            results, self._results = self._results, []
            self._pending -= len(results)
            if not results and not self._closing:
                self._raise_if_stopped()
            return results

    def pending(self) -> int:
        """Calls submitted and not yet returned by `poll` (queued, running, or finished and unpolled)."""
        with self._cond:
            return self._pending

    def stats(self) -> dict[str, int]:
        """Cumulative counters: calls finished (scored, failed or timed out), errors, timeouts."""
        with self._cond:
            return dict(self._counts)

    def close(self) -> None:
        """Kill every worker's process group and stop the pool thread; unfinished calls are dropped.
        Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_if_stopped(self) -> None:
        if self._closing:
            raise RuntimeError("the reward pool is closed")
        if self._failure is not None:
            raise RuntimeError(f"reward workers for rewards.name={self.name!r} stopped: {self._failure}")

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread is awake already
            pass

    # --- the pool thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for _ in range(self.num_workers):  # one by one: `finally` kills those started if one fails
                self._workers.append(self._spawn())
            while not self._closing and self._failure is None and self._load_error is None:
                if not self._started.is_set() and all(w.ready for w in self._workers):
                    self._started.set()
                self._step()
        except BaseException as err:  # noqa: BLE001 - reported to the caller by poll/submit
            self._failure = f"{type(err).__name__}: {err}"
            logger.exception("reward pool thread failed")
        finally:
            for worker in self._workers:
                _kill(worker)
            with self._cond:
                self._cond.notify_all()
            self._started.set()

    def _step(self) -> None:
        """Wait for a message, a wake-up or the nearest deadline; then handle them and dispatch calls."""
        now = time.monotonic()
        timeout = min([self.WATCH_S] + [max(0.0, w.deadline - now) for w in self._workers])
        by_conn = {w.conn: w for w in self._workers}
        for ready in wait([self._wake_r, *by_conn], timeout):
            if ready == self._wake_r:
                while True:  # drain; the pipe only says "look again"
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            else:
                self._receive(by_conn[ready])
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.proc.poll() is not None and worker.conn in by_conn:  # died without us seeing EOF
                self._died(worker)
            elif now >= worker.deadline:
                self._expired(worker)
        self._dispatch()

    def _spawn(self) -> _Worker:
        parent_end, child_end = multiprocessing.Pipe(duplex=True)  # a socketpair; no process involved
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "megatron_oapl.rewards.pool_worker", str(child_end.fileno()),
                 str(os.getpid()), self.name],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            child_end.close()  # the worker holds the only copy: its exit is our EOF
        try:
            parent_end.send(("init", list(sys.path), self.settings))
        except OSError:  # it died at once: the next step sees its exit and counts a failed start
            pass
        return _Worker(proc, parent_end, deadline=time.monotonic() + self.START_TIMEOUT_S)

    def _replace(self, worker: _Worker) -> None:
        _kill(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def _receive(self, worker: _Worker) -> None:
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            self._died(worker)
            return
        if msg[0] == "ready":
            worker.ready, worker.deadline = True, float("inf")
            self._start_failures = 0
        elif msg[0] == "load_error":
            if not self._started.is_set():
                self._load_error = msg[1]
            else:
                self._start_failed(worker, msg[1])
        else:
            call, worker.call, worker.deadline = worker.call, None, float("inf")
            _, value, error = msg
            self._finish(RewardResult(call.key, value if error is None else 0.0, error), call.prompt)

    def _died(self, worker: _Worker) -> None:
        try:
            code = worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # alive, but it closed our socket
            code = None
        why = ("closed its connection" if code is None else
               f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}")
        if worker.call is not None:
            self._finish(RewardResult(worker.call.key, 0.0, f"the reward worker process {why} during the call"),
                         worker.call.prompt)
            worker.call = None
            self._replace(worker)
        elif not worker.ready:
            self._start_failed(worker, f"the reward worker process {why} while starting")
        else:
            self._replace(worker)

    def _expired(self, worker: _Worker) -> None:
        if worker.call is not None:
            self._finish(RewardResult(worker.call.key, 0.0, None, timed_out=True), worker.call.prompt)
            worker.call = None
            self._replace(worker)
        elif not worker.ready:
            self._start_failed(worker, f"not ready after {self.START_TIMEOUT_S:.0f} s")

    def _start_failed(self, worker: _Worker, why: str) -> None:
        self._start_failures += 1
        if self._start_failures >= self.MAX_START_FAILURES or not self._started.is_set():
            self._failure = why
            return
        logger.warning("reward worker for %r failed to start (%s); starting another", self.name, why)
        self._replace(worker)

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not worker.ready or worker.call is not None:
                continue
            with self._cond:
                if not self._queue:
                    return
                call = self._queue.popleft()
            try:
                worker.conn.send((id(call), call.text, call.prompt, call.reward))
            except OSError:  # the worker died while idle: the call goes back first in line
                with self._cond:
                    self._queue.appendleft(call)
                self._died(worker)
                continue
            except Exception as err:  # noqa: BLE001 - e.g. a prompt that cannot be pickled: that call fails
                self._finish(RewardResult(call.key, 0.0, f"could not send the call to a worker: "
                                                         f"{type(err).__name__}: {err}"), call.prompt)
                continue
            worker.call, worker.deadline = call, time.monotonic() + self.timeout_s

    def _finish(self, result: RewardResult, prompt: Prompt) -> None:
        with self._cond:
            self._counts["calls"] += 1
            if result.error is not None:
                self._counts["errors"] += 1
                n = self._counts["errors"]
            elif result.timed_out:
                self._counts["timeouts"] += 1
                n = self._counts["timeouts"]
            else:
                n = 0
            self._results.append(result)
            self._cond.notify_all()
        if 0 < n <= self.LOG_FIRST:
            more = " (further ones are only counted)" if n == self.LOG_FIRST else ""
            what = (f"timed out after {self.timeout_s:g} s" if result.timed_out else f"failed: {result.error}")
            logger.warning("reward %r on prompt %s %s (scored 0; %s #%d)%s", self.name, prompt.prompt_id, what,
                           "timeout" if result.timed_out else "error", n, more)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


def _kill(worker: _Worker) -> None:
    """SIGKILL the worker's process group and every descendant we can still see, and reap the worker."""
    import psutil

    try:  # a reward's process that left the group (setsid) is still the worker's descendant until it dies
        descendants = psutil.Process(worker.proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the worker leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in descendants:
        try:
            proc.kill()
        except psutil.Error:
            pass
    worker.proc.wait()
    worker.conn.close()
