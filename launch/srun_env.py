"""Run one learner rank under `srun`: set torchrun's environment from SLURM's, then exec the command.

    srun ... python -m launch.srun_env -- python -m megatron_oapl.cli train RUN_DIR/launch/config.yaml

Sets (never overriding a value already exported, so a user's `--env` wins):
    RANK             = SLURM_PROCID
    WORLD_SIZE       = SLURM_STEP_NUM_TASKS (or SLURM_NTASKS)
    LOCAL_RANK       = SLURM_LOCALID        (the learner picks its GPU with it: torch.cuda.set_device)
    LOCAL_WORLD_SIZE = tasks of this step on this node
    MASTER_ADDR      = the address (NodeAddr) of the first node of the step; the batch script exports it
    MASTER_PORT      = 29500 unless exported (the batch script derives one from the job id)
    OMP_NUM_THREADS  = SLURM_CPUS_PER_TASK   (torch otherwise starts one thread per core of the node)

and logs one placement line per rank to stderr (it lands in the learner log). Standard library and
`log_setup` only: it runs before anything is imported, also inside containers.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[1-3,7],gpu01` -> ['node1', 'node2', 'node3', 'node7', 'gpu01'] (`scontrol show hostnames`,
    with a pure-Python fallback for the common forms)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{str(i).zfill(len(lo))}")
    return names


def node_addr(node: str) -> str:
    """The address SLURM reaches `node` at (its NodeAddr), else the name itself."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30)
        match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if match:
            return match.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return node


def _tasks_on_this_node(env: dict[str, str]) -> str | None:
    """SLURM_STEP_TASKS_PER_NODE looks like `4(x2),3`; pick the entry of this node (SLURM_NODEID)."""
    spec, node_id = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not spec:
        return None
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [count] * int(repeat or 1)
    idx = int(node_id or 0)
    return counts[idx] if idx < len(counts) else counts[-1]


def torchrun_env(env: dict[str, str]) -> dict[str, str]:
    """The variables to add to `env` (those already present are kept as they are)."""
    if "SLURM_PROCID" not in env:
        raise SystemExit("launch.srun_env: SLURM_PROCID is not set; run this under srun")
    new = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": "29500",
    }
    local_world = _tasks_on_this_node(env)
    if local_world:
        new["LOCAL_WORLD_SIZE"] = local_world
    if env.get("SLURM_CPUS_PER_TASK"):
        new["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
    if "MASTER_ADDR" not in env:
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        new["MASTER_ADDR"] = node_addr(nodes[0]) if nodes else "127.0.0.1"
    return {k: v for k, v in new.items() if k not in env}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m launch.srun_env -- COMMAND [ARGS...]")
    env = dict(os.environ)
    env.update(torchrun_env(env))
    from megatron_oapl.log_setup import setup_logging

    setup_logging(f"rank {env['RANK']}")
    logging.getLogger("oapl.srun_env").info(
        "rank %s/%s local_rank %s on node %s (host %s) master %s:%s restart %s", env["RANK"], env["WORLD_SIZE"],
        env["LOCAL_RANK"], env.get("SLURMD_NODENAME", "?"), socket.gethostname(), env["MASTER_ADDR"],
        env["MASTER_PORT"], env.get("SLURM_RESTART_COUNT", "0"))
    sys.stderr.flush()  # before exec replaces this process
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
