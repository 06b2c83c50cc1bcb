"""Who keeps the engine processes running. The fleet's dealer (rollout/fleet.py) deals orders and keeps the
sync bookkeeping; it asks one of these whether an engine lives and which process (generation) it is:

- `LocalSupervisor`: engine processes on this machine, for the coordinator's local fleet and for each fleet
  node of an external fleet (rollout/fleet_node.py). It spawns them (rollout/placement.py gives each its
  environment), restarts a dead one from the initial weights with the next generation while
  fleet.max_restarts allows (then `FleetGaveUp`), and stops them: a wait, SIGTERM, then SIGKILL.
- `RemoteSupervisor`: the coordinator's view of engines that fleet nodes run elsewhere (fleet.external).
  A node restarts its crashed engines itself; here an engine's `Hello` of a newer generation counts that
  restart, and the node's `Died` marks the engine dead until its successor says hello.

Both count restarts and call `on_restart(total)` the moment one happens (`fleet/engine_restarts_total` is
written then), and `on_start(engine, generation)` when a new process of an engine id exists, so the dealer
forgets what it knew about the old one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable

from megatron_oapl.rollout.engine_worker import engine_main
from megatron_oapl.rollout.messages import Died, Hello

log = logging.getLogger(__name__)

COORDINATOR_FILE = "coordinator.json"


class FleetGaveUp(RuntimeError):
    """An engine died once more than fleet.max_restarts allows; the message names the engine, its exit code
    and the limit (one line: the learners save their last finished step and the run ends)."""


def spawn_engine(mp_ctx, engine_id: int, generation: int, cfg_dict: dict, model_dir: str, rollout_addr: str,
                 control_addr: str, daemon: bool = False, env: dict[str, str] | None = None) -> mp.Process:
    """Start `engine_main` in a spawned process with `env` (rollout/placement.py: its GPUs, the compile
    cache) on top of this process's environment."""
    proc = mp_ctx.Process(
        target=engine_main, name=f"oapl-engine-{engine_id}", daemon=daemon,
        args=(engine_id, generation, cfg_dict, model_dir, rollout_addr, control_addr),
    )
    with _environment(env or {}):  # a spawned child takes the environment as it is at start()
        proc.start()
    return proc


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` set in os.environ for the duration, the previous values restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restart_refusal(cfg, engine_id: int, restarts: int, exitcode: int | None) -> str | None:
    """Why a dead engine must not be restarted (its fleet.max_restarts are used up), or None to restart."""
    if restarts < cfg.fleet.max_restarts:
        return None
    return (f"engine {engine_id} died {restarts + 1} times (exit code {exitcode}); "
            f"fleet.max_restarts={cfg.fleet.max_restarts} reached")


class _Supervisor:
    """What both supervisors share: per engine id its generation and restarts, the run's restart total."""

    def __init__(self, cfg, engine_ids: list[int], first_generation: int):
        self.cfg = cfg
        self.generation = {e: first_generation for e in engine_ids}
        self.restarts = {e: 0 for e in engine_ids}
        self.restarts_total = 0
        self.on_start: Callable[[int, int], None] = lambda engine_id, generation: None
        self.on_restart: Callable[[int], None] = lambda total: None

    def _restarted(self, engine_id: int, generation: int) -> None:
        self.restarts[engine_id] += 1
        self.restarts_total += 1
        self.generation[engine_id] = generation
        self.on_start(engine_id, generation)
        self.on_restart(self.restarts_total)


class LocalSupervisor(_Supervisor):
    """Engine processes spawned here. `envs`: engine id -> its environment (placement). `daemon`: the
    processes end with this one (a TP engine cannot be daemonic: vLLM starts worker processes; it still dies
    with us through die_with_parent). `clean_exit_stops`: an engine that exits 0 was told to stop and stays
    down (a fleet node, whose engines the coordinator stops); otherwise it is restarted like any death."""

    def __init__(self, cfg, cfg_dict: dict, model_dir: str, rollout_addr: str, control_addr: str,
                 envs: dict[int, dict[str, str]], daemon: bool, clean_exit_stops: bool = False):
        super().__init__(cfg, list(envs), first_generation=0)
        self.cfg_dict, self.model_dir, self.envs = cfg_dict, model_dir, envs
        self.addresses = (rollout_addr, control_addr)
        self.daemon, self.clean_exit_stops = daemon, clean_exit_stops
        self.on_death: Callable[[Died], None] = lambda died: None  # a fleet node reports it to the coordinator
        self.procs: dict[int, mp.Process] = {}
        self.killed_for: dict[int, str] = {}  # why the coordinator killed it (said again if it may not restart)
        self._mp = mp.get_context("spawn")

    def start(self) -> None:
        for engine_id in self.envs:
            self._spawn(engine_id)
            self.on_start(engine_id, self.generation[engine_id])

    def _spawn(self, engine_id: int) -> None:
        self.procs[engine_id] = spawn_engine(self._mp, engine_id, self.generation[engine_id], self.cfg_dict,
                                             self.model_dir, *self.addresses, daemon=self.daemon,
                                             env=self.envs[engine_id])

    def pid(self, engine_id: int) -> int | None:
        return self.procs[engine_id].pid

    def is_alive(self, engine_id: int) -> bool:
        return self.procs[engine_id].is_alive()

    def heard(self, msg: Hello | Died) -> None:
        """Its own engines' hellos tell it nothing: it knows their generations."""

    def restart_dead(self) -> list[int]:
        """Restart the engines whose process died (a clean exit, with `clean_exit_stops`, is no death);
        returns their ids. Raises `FleetGaveUp` for one that used up fleet.max_restarts."""
        restarted = []
        for engine_id, proc in list(self.procs.items()):
            if proc.is_alive() or (self.clean_exit_stops and proc.exitcode == 0):
                continue
            self.on_death(Died(engine_id, self.generation[engine_id], proc.exitcode))
            refusal = restart_refusal(self.cfg, engine_id, self.restarts[engine_id], proc.exitcode)
            if refusal:
                why = self.killed_for.get(engine_id)
                raise FleetGaveUp(refusal + (f"; it was killed because it {why}" if why else ""))
            log.warning("engine %d died (exit code %s); restarting", engine_id, proc.exitcode)
            self.killed_for.pop(engine_id, None)
            self.generation[engine_id] += 1
            self._spawn(engine_id)
            self._restarted(engine_id, self.generation[engine_id])
            restarted.append(engine_id)
        return restarted

    def all_stopped(self) -> bool:
        """Every engine exited cleanly (the coordinator told it to stop)."""
        return all(not p.is_alive() and p.exitcode == 0 for p in self.procs.values())

    def kill(self, engine_id: int, why: str) -> None:
        """End an engine the coordinator gave up on (`why`); `restart_dead` then restarts it."""
        log.error("engine %d %s: killing it (it is restarted like a crashed engine)", engine_id, why)
        self.killed_for[engine_id] = why
        self.procs[engine_id].kill()
        self.procs[engine_id].join()

    def stop(self, wait_s: float = 10.0, terminate_wait_s: float = 5.0) -> None:
        """Wait up to `wait_s` for engines told to stop, SIGTERM the rest, then SIGKILL what still runs (a
        hung or frozen engine: SIGSTOP)."""
        for proc in self.procs.values():
            proc.join(timeout=wait_s)
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout=terminate_wait_s)
            if proc.is_alive():
                proc.kill()
                proc.join()


class RemoteSupervisor(_Supervisor):
    """Engines run by fleet nodes elsewhere (fleet.external): alive until their node says they died; an
    engine's generation is unknown (-1) until its first hello. The coordinator publishes its addresses in
    RUN_DIR/coordinator.json for the nodes and removes the file when it stops."""

    def __init__(self, cfg, engine_ids: list[int]):
        super().__init__(cfg, engine_ids, first_generation=-1)
        self.alive = {e: True for e in engine_ids}
        self._restarted_remotely: list[int] = []

    def publish(self, rollout_addr: str, control_addr: str, weight_store: tuple[str, int]) -> Path:
        """Write RUN_DIR/coordinator.json (atomically): where fleet nodes connect, for this job and restart."""
        path = Path(self.cfg.run_dir) / COORDINATOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "rollout_addr": rollout_addr, "control_addr": control_addr, "weight_store": list(weight_store),
            "job_id": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }))
        os.replace(tmp, path)
        return path

    def start(self) -> None:
        """Nothing to start: the nodes start their engines once the coordinator's file appears."""

    def is_alive(self, engine_id: int) -> bool:
        return self.alive[engine_id]

    def heard(self, msg: Hello | Died) -> None:
        engine_id = msg.engine
        if isinstance(msg, Hello) and msg.generation > self.generation[engine_id]:
            self.alive[engine_id] = True
            if self.generation[engine_id] < 0:  # its first hello
                self.generation[engine_id] = msg.generation
                self.on_start(engine_id, msg.generation)
                return
            # Its fleet node restarted it: weights of version 0 again.
            self._restarted(engine_id, msg.generation)
            self._restarted_remotely.append(engine_id)
            log.warning("engine %d is back (generation %d, restarted by its fleet node): re-syncing it",
                        engine_id, msg.generation)
        elif isinstance(msg, Died) and msg.generation == self.generation[engine_id]:
            log.warning("engine %d died on its fleet node (exit code %s)", engine_id, msg.exitcode)
            self.alive[engine_id] = False

    def restart_dead(self) -> list[int]:
        """The engines their fleet nodes restarted since the last call (they said hello again)."""
        restarted, self._restarted_remotely = self._restarted_remotely, []
        return restarted

    def kill(self, engine_id: int, why: str) -> None:
        # Its fleet node restarts crashes only; a refusal is no crash there.
        raise RuntimeError(f"engine {engine_id} (external) {why}")

    def stop(self) -> None:
        # A fleet node started later must not connect to this run's dead addresses.
        (Path(self.cfg.run_dir) / COORDINATOR_FILE).unlink(missing_ok=True)
