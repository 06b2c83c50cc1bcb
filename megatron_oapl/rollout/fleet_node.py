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
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from megatron_oapl.rollout.fleet import COORDINATOR_FILE, restart_refusal, spawn_engine
from megatron_oapl.rollout.messages import Died
from megatron_oapl.rollout.placement import engine_environments

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
    def __init__(self, cfg, cfg_dict: dict, info: dict, engine_ids: list[int],
                 engine_env: list[dict[str, str]] | None = None):
        self.cfg, self.cfg_dict, self.info = cfg, cfg_dict, info
        # Local engine i's GPUs and compile cache (rollout/placement.py; main computes them before waiting).
        self.engine_env = engine_env if engine_env is not None else node_engine_environments(cfg, len(engine_ids))
        self.zctx = zmq.Context()
        # Its own DEALER on the control channel: reports engine deaths as soon as they happen.
        self.control = self.zctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, f"node-{os.getpid()}".encode())
        self.control.connect(info["control_addr"])
        self._mp = mp.get_context("spawn")
        self.procs: dict[int, mp.Process] = {}
        self.generation = {e: 0 for e in engine_ids}
        self.restarts = {e: 0 for e in engine_ids}
        self.local = {e: i for i, e in enumerate(engine_ids)}  # global engine id -> index on this node
        for engine_id, local in self.local.items():
            self._start(engine_id, local)

    def _start(self, engine_id: int, local: int) -> None:
        proc = spawn_engine(self._mp, engine_id, self.generation[engine_id], self.cfg_dict, self.cfg.model.hf_path,
                            self.info["rollout_addr"], self.info["control_addr"], env=self.engine_env[local])
        self.procs[engine_id] = proc
        print(f"[fleet] engine {engine_id} generation {self.generation[engine_id]} started (pid {proc.pid})",
              flush=True)

    def step(self) -> int | None:
        """Check the engines once: restart crashed ones. Returns an exit code once the node is done."""
        finished = 0
        for engine_id, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            if proc.exitcode == 0:  # the coordinator told it to stop
                finished += 1
                continue
            self.control.send_pyobj(Died(engine_id, self.generation[engine_id], proc.exitcode))
            refusal = restart_refusal(self.cfg, engine_id, self.restarts[engine_id], proc.exitcode)
            if refusal:
                print(f"[fleet] {refusal}", flush=True)
                return 1
            print(f"[fleet] engine {engine_id} died (exit code {proc.exitcode}); restarting", flush=True)
            self.restarts[engine_id] += 1
            self.generation[engine_id] += 1
            self._start(engine_id, self.local[engine_id])
        return 0 if finished == len(self.procs) else None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
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
        print(f"[fleet] {err}", file=sys.stderr, flush=True)
        return 1
    path = Path(args.coordinator_file or Path(cfg.run_dir) / COORDINATOR_FILE)
    try:
        info = wait_for_coordinator(path, cfg.fleet.start_timeout_s)
    except TimeoutError as err:
        print(f"[fleet] {err}", file=sys.stderr, flush=True)
        return 1
    import socket

    print(f"[fleet] node {os.environ.get('SLURMD_NODENAME', socket.gethostname())} (index {args.node_index}): "
          f"engines {engine_ids} for the coordinator at {info['control_addr']}", flush=True)
    node = FleetNode(cfg, to_dict(cfg), info, engine_ids, engine_env)
    try:
        while not stopping:
            code = node.step()
            if code is not None:
                return code
            time.sleep(0.2)
        print("[fleet] SIGTERM: stopping the engines", flush=True)
        return 0
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
