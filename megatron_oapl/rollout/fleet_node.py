"""One fleet node of an external fleet (`fleet.external=true`): runs N engine processes that serve the
coordinator of the run, restarts those that crash, and exits when the coordinator stops them.

    python -m megatron_oapl.rollout.fleet_node RUN_CONFIG [overrides] --engines N \\
        [--coordinator-file RUN_DIR/coordinator.json] [--node-index P]

Node P (default: SLURM_PROCID, else 0) owns the global engine ids P*N ... P*N+N-1 (those below
fleet.num_engines); local engine i sees GPUs i*T ... i*T+T-1 of the node (T =
fleet.engine_tensor_parallel_size) through CUDA_VISIBLE_DEVICES (rollout/placement.py; a node with fewer
than N*T GPUs exits 1 before starting anything), and VLLM_CACHE_ROOT = fleet.compile_cache_dir (default
RUN_DIR/vllm_cache). The node waits for the coordinator's
`coordinator.json` (up to fleet.start_timeout_s; under SLURM it must carry this job's id and restart
count, so a stale file from an earlier run is never used), then starts its engines, which say hello to
the coordinator themselves. A crashed engine is reported to the coordinator (`died`, so a weight push in
flight aborts at once) and restarted with the next generation, at most fleet.max_restarts times; the
coordinator re-syncs it and deals it new orders. Exit codes: 0 once every engine was told to stop (or on
SIGTERM, after stopping them), 1 when an engine exceeds its restarts, the coordinator never appears or
the node has too few GPUs for its engines.
SIGUSR1 is ignored: only the learners checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from megatron_oapl.rollout.placement import engine_environments
from megatron_oapl.rollout.supervisor import COORDINATOR_FILE, FleetGaveUp, LocalSupervisor

log = logging.getLogger("oapl.fleet_node")


def wait_for_coordinator(path: Path, timeout_s: float) -> dict:
    """The coordinator's addresses, once it has published them for this job (and this restart)."""
    job_id, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            info = json.loads(path.read_text())
            if job_id is None or (info.get("job_id") == job_id and str(info.get("restart")) == restart):
                return info
        time.sleep(0.5)
    raise TimeoutError(f"no {path} for SLURM job {job_id} restart {restart} within {timeout_s:.0f} s "
                       "(fleet.start_timeout_s): did the learners start?")


def local_engine_ids(node_index: int, engines_per_node: int, num_engines: int) -> list[int]:
    first = node_index * engines_per_node
    return [e for e in range(first, first + engines_per_node) if e < num_engines]


def node_engine_environments(cfg, engines: int) -> list[dict[str, str]]:
    """Each local engine's environment: the node's GPUs dealt engine_tensor_parallel_size at a time (no
    learner here), the run's compile cache; ConfigError when the node has too few GPUs."""
    return engine_environments(cfg, engines, learner_ranks=0, engines_field="--engines")


class FleetNode:
    """This node's engines under a `LocalSupervisor` that reports each death to the coordinator at once
    (`Died` on the node's own DEALER, so a weight push in flight aborts) and leaves an engine the
    coordinator stopped (exit code 0) down."""

    def __init__(self, cfg, cfg_dict: dict, info: dict, engine_ids: list[int],
                 engine_env: list[dict[str, str]] | None = None):
        # Local engine i's GPUs and compile cache (rollout/placement.py; main computes them before waiting).
        engine_env = engine_env if engine_env is not None else node_engine_environments(cfg, len(engine_ids))
        self.zctx = zmq.Context()
        self.control = self.zctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, f"node-{os.getpid()}".encode())
        self.control.connect(info["control_addr"])
        self.supervisor = LocalSupervisor(cfg, cfg_dict, cfg.model.hf_path, info["rollout_addr"], info["control_addr"],
                                          dict(zip(engine_ids, engine_env)), daemon=False, clean_exit_stops=True)
        self.supervisor.on_death = self.control.send_pyobj
        self.supervisor.on_start = self._started
        self.supervisor.start()

    def _started(self, engine_id: int, generation: int) -> None:
        log.info("engine %d generation %d started (pid %s)", engine_id, generation, self.supervisor.pid(engine_id))

    def step(self) -> int | None:
        """Check the engines once: restart crashed ones. Returns an exit code once the node is done."""
        try:
            self.supervisor.restart_dead()
        except FleetGaveUp as err:
            log.error("%s", err)
            return 1
        return 0 if self.supervisor.all_stopped() else None

    def stop(self) -> None:
        self.supervisor.stop(wait_s=0, terminate_wait_s=10)
        self.control.close(0)
        self.zctx.term()


def main(argv: list[str] | None = None) -> int:
    from megatron_oapl.config import ConfigError, load_config, to_dict
    from megatron_oapl.log_setup import setup_logging
    from megatron_oapl.models.hf_config import resolve_model

    setup_logging("fleet node")
    parser = argparse.ArgumentParser(prog="python -m megatron_oapl.rollout.fleet_node",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the run's YAML config (under SLURM: RUN_DIR/launch/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fleet.max_restarts=5")
    parser.add_argument("--engines", type=int, required=True, help="engine processes on this node (N)")
    parser.add_argument("--coordinator-file", help="default: RUN_DIR/coordinator.json")
    parser.add_argument("--node-index", type=int, default=int(os.environ.get("SLURM_PROCID", 0)),
                        help="P: this node owns engines P*N ... P*N+N-1 (default: SLURM_PROCID, else 0)")
    args = parser.parse_args(argv)
    cfg = resolve_model(load_config(args.config, tuple(args.overrides), check_hardware=False))
    if not cfg.fleet.external:
        parser.error("the config has fleet.external=false: the coordinator spawns its own engines")
    if args.engines < 1:
        parser.error(f"--engines={args.engines} must be >= 1")
    engine_ids = local_engine_ids(args.node_index, args.engines, cfg.fleet.num_engines)
    if not engine_ids:
        parser.error(f"--node-index={args.node_index} x --engines={args.engines} owns no engine id below "
                     f"fleet.num_engines={cfg.fleet.num_engines}")

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:  # refused before waiting or starting anything
        engine_env = node_engine_environments(cfg, len(engine_ids))
    except ConfigError as err:
        log.error("%s", err)
        return 1
    path = Path(args.coordinator_file or Path(cfg.run_dir) / COORDINATOR_FILE)
    try:
        info = wait_for_coordinator(path, cfg.fleet.start_timeout_s)
    except TimeoutError as err:
        log.error("%s", err)
        return 1
    import socket

    log.info("node %s (index %d): engines %s for the coordinator at %s",
             os.environ.get("SLURMD_NODENAME", socket.gethostname()), args.node_index, engine_ids, info["control_addr"])
    node = FleetNode(cfg, to_dict(cfg), info, engine_ids, engine_env)
    try:
        while not stopping:
            code = node.step()
            if code is not None:
                return code
            time.sleep(0.2)
        log.info("SIGTERM: stopping the engines")
        return 0
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
