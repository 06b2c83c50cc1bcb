"""`oapl launch slurm`: check a run against the cluster, render an sbatch script, submit it.

    # heterogeneous job: component 0 = 2 learner nodes (TP x PP x DP = 16 ranks), component 1 = 1 fleet node
    oapl launch slurm configs/qwen3_4b_math.yaml run_dir=/lustre/runs/q4 \\
        --learner-nodes 2 --learner-gpus-per-node 8 --learner-partition train \\
        --fleet-nodes 1 --fleet-gpus-per-node 8 --fleet-partition infer \\
        --time 04:00:00 --container-image /lustre/images/oapl.sqsh --dry-run
    # one job, node split (first 2 nodes learners, the rest fleet): clusters without het-job support
    oapl launch slurm CONFIG --homogeneous --learner-nodes 2 --fleet-nodes 1 --partition gpu
    # the same without the `oapl` entry point (from the repository root)
    python -m launch.slurm CONFIG [key=value ...] [options]

What happens, in order (nothing is submitted unless every check passes):
1. The run config is loaded with the overrides and validated (the login node needs no GPU); relative
   `run_dir`, `model.hf_path`, `data.path`, eval sets' files and `lag.offline_dataset` become absolute (the
   job runs in --workdir), and those files must exist.
2. The cluster is queried (`scontrol show partition/node`): partitions exist, enough nodes with the CPUs
   and GPUs asked; TP*PP divides the learner ranks; the engine TP divides the fleet node's GPUs; paths the
   compute nodes need are not node-local; pyxis is there when a container is asked; finally
   `sbatch --test-only` must accept the script. Every error names the option (or config field) and value.
3. `RUN_DIR/launch/config.yaml` (the resolved config the job trains with) and `RUN_DIR/launch/sbatch.sh`
   are written, the script is submitted, and its job id goes to `RUN_DIR/launch/job_id`.
   `--dry-run` prints the script instead and writes nothing.

The script (launch/templates/*.sh.j2) writes `RUN_DIR/config.yaml` (`oapl config show` of the job config)
on the compute side, starts the fleet step and the learner step (`srun`, one task per learner rank,
torchrun variables from `launch.srun_env`), forwards the `--signal` warning to the learners, and
re-queues itself after that warning when `--requeue` is given. Logs: `RUN_DIR/logs/`. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from megatron_oapl.plan import add_memory_check_arguments, launch_memory_check

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"

# Exported in every job unless --no-default-env; `--env KEY=VAL` overrides any of them.
DEFAULT_ENV: dict[str, str] = {
    # Logs appear as they are written, not when a 4 KiB buffer fills.
    "PYTHONUNBUFFERED": "1",
    # NCCL prints warnings (INFO is very verbose; set --env NCCL_DEBUG=INFO to debug a hang).
    "NCCL_DEBUG": "WARN",
    # A failed or timed-out collective raises on every rank instead of hanging until the time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Tokenizers would otherwise start a thread pool per rank (and warn after fork).
    "TOKENIZERS_PARALLELISM": "false",
}

# Exported into the learner step only (unless --no-default-env, or --env sets the variable for the whole job).
DEFAULT_LEARNER_ENV: dict[str, str] = {
    # Megatron needs kernels of one stream queued in order for its TP/SP communication overlap; vLLM's
    # engines would lose their stream concurrency with it (review P9).
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}

# CPU binding of the learner step on GPU nodes (review P9): each rank's cores, filled socket by socket in
# rank order, so LOCAL_RANK i (GPU i) sits on the socket of GPUs 0..n/2-1 or n/2..n-1 as on DGX/HGX boards.
# Not --gpu-bind=closest: that shows each task only its socket's GPUs, and LOCAL_RANK would no longer
# index them (torch.cuda.set_device(LOCAL_RANK) fails for half the ranks).
LEARNER_GPU_BINDING = ("--cpu-bind=cores", "--distribution=block:block")

# Path prefixes that are node-local on virtually every cluster: a compute node sees its own, empty, copy.
LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/local", "/localscratch", "/scratch/local")
LOCAL_FS_TYPES = ("tmpfs", "ramfs", "devtmpfs")


class LaunchError(Exception):
    """The run cannot be launched as asked; `errors` lists each problem (one option/value each)."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------------
# The cluster, as `scontrol` describes it
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NodeInfo:
    name: str
    cpus: int
    gpus: int
    state: str
    partitions: list[str]


@dataclasses.dataclass
class PartitionInfo:
    name: str
    default: bool
    state: str
    nodes: list[NodeInfo] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ClusterInfo:
    partitions: dict[str, PartitionInfo]
    pyxis: bool  # srun knows --container-image (the pyxis SPANK plugin is loaded)

    def default_partition(self) -> str | None:
        return next((p.name for p in self.partitions.values() if p.default), None)


def _scontrol_records(args: list[str]) -> list[dict[str, str]]:
    out = _run(["scontrol", *args, "-o"])
    records = []
    for line in out.splitlines():
        fields: dict[str, str] = {}
        # Values never contain spaces except OS=/Reason=, which come last-ish; split on ` Key=`.
        for match in re.finditer(r"(\w[\w/:.]*)=(.*?)(?=\s+\w[\w/:.]*=|$)", line.strip()):
            fields.setdefault(match.group(1), match.group(2))
        if fields:
            records.append(fields)
    return records


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError([f"`{cmd[0]}` is not installed here: run `oapl launch slurm` on a SLURM login node "
                           "(or pass --no-cluster-check with --dry-run to only render the script)"]) from None
    except subprocess.TimeoutExpired:
        raise LaunchError([f"`{' '.join(cmd)}` did not answer within 60 s: is slurmctld reachable?"]) from None
    if proc.returncode != 0:
        raise LaunchError([f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}"])
    return proc.stdout


def gpus_of(gres: str) -> int:
    """GPUs in a node's `Gres=` (`gpu:8(S:0-1)`, `gpu:h100:4,nic:2`, `(null)`)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres or ""))


def query_cluster() -> ClusterInfo:
    partitions = {
        r["PartitionName"]: PartitionInfo(r["PartitionName"], r.get("Default") == "YES", r.get("State", "UP"))
        for r in _scontrol_records(["show", "partition"])
    }
    for r in _scontrol_records(["show", "node"]):
        cpus = int(r.get("CPUEfctv") or r.get("CPUTot") or 0)
        node = NodeInfo(r["NodeName"], cpus, gpus_of(r.get("Gres", "")), r.get("State", ""),
                        [p for p in r.get("Partitions", "").split(",") if p])
        for p in node.partitions:
            if p in partitions:
                partitions[p].nodes.append(node)
    try:
        help_text = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        help_text = ""
    return ClusterInfo(partitions, "--container-image" in help_text)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*",
                   help="dotted config overrides, e.g. run_dir=/shared/runs/a optim.train_steps=50")
    _add_component_arguments(p)
    _add_job_arguments(p)
    _add_environment_arguments(p)
    g = p.add_argument_group("checks and output")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    g.add_argument("--no-cluster-check", action="store_true",
                   help="do not query the cluster (render without sinfo/scontrol; only with --dry-run)")
    g.add_argument("--allow-local-paths", action="store_true",
                   help="allow run_dir / workdir / model / python under node-local paths (/tmp, /dev/shm, ...): "
                        "only right when the login and compute nodes are the same machine")
    add_memory_check_arguments(g)  # --gpu-memory-gb, --force: the memory plan (megatron_oapl/plan.py)


def _add_component_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learners (heterogeneous component 0; the first nodes with --homogeneous)")
    g.add_argument("--learner-nodes", type=int, default=1, help="learner nodes (default 1)")
    g.add_argument("--learner-gpus-per-node", type=int, default=None,
                   help="GPUs per learner node, one learner rank each (default: all GPUs of the partition's "
                        "nodes; 0 = CPU nodes)")
    g.add_argument("--learner-tasks-per-node", type=int, default=None,
                   help="learner ranks per node (default: the GPUs per node; on CPU nodes TP*PP*DP / nodes)")
    g.add_argument("--learner-cpus-per-task", type=int, default=None,
                   help="CPUs per learner rank (default: the node's CPUs / ranks per node)")
    g.add_argument("--learner-partition", help="partition of the learner nodes (default: --partition, else "
                   "the cluster's default partition)")
    g.add_argument("--learner-account", help="account charged for the learner nodes (default: --account)")
    g.add_argument("--learner-time", help="time limit of the learner component (default: --time)")
    g.add_argument("--learner-sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH option for the learner component, e.g. --learner-sbatch-arg=--qos=high "
                        "(repeatable)")

    g = p.add_argument_group("fleet (heterogeneous component 1; the remaining nodes with --homogeneous)")
    g.add_argument("--fleet-nodes", type=int, default=None,
                   help="fleet nodes (default 1, and 0 with lag.mode=offline, which runs no fleet; 0 = no fleet "
                        "component: engines run beside the coordinator)")
    g.add_argument("--fleet-gpus-per-node", type=int, default=None,
                   help="GPUs per fleet node: one engine per fleet.engine_tensor_parallel_size GPUs "
                        "(default: all GPUs of the partition's nodes; 0 = CPU nodes)")
    g.add_argument("--fleet-cpus-per-node", type=int, default=None,
                   help="CPUs per fleet node (default: all CPUs of the partition's smallest node)")
    g.add_argument("--fleet-partition", help="partition of the fleet nodes (default: --partition)")
    g.add_argument("--fleet-account", help="account charged for the fleet nodes (default: --account)")
    g.add_argument("--fleet-time", help="time limit of the fleet component (default: --time)")
    g.add_argument("--fleet-sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH option for the fleet component (repeatable)")
    g.add_argument("--fleet-mode", choices=("local", "external"), default=None,
                   help="external (the default with fleet nodes): the fleet step runs `python -m "
                        "megatron_oapl.rollout.fleet_node` on every fleet node, whose engines serve the coordinator "
                        "(sets fleet.external=true); local (the default with --fleet-nodes 0): the coordinator "
                        "starts the engines beside itself, and fleet nodes, if any, only record their placement")


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--partition", help="partition of both components (per-component options win)")
    g.add_argument("--account", help="account of both components")
    g.add_argument("--time", help="time limit of both components, e.g. 04:00:00")
    g.add_argument("--job-name", help="job name (default: oapl-<run_dir name>)")
    g.add_argument("--homogeneous", action="store_true",
                   help="one ordinary job of learner+fleet nodes (first --learner-nodes nodes run the "
                        "learners, the rest the fleet), for clusters without heterogeneous jobs")
    g.add_argument("--exclusive", action="store_true", help="whole nodes (sbatch --exclusive)")
    g.add_argument("--signal", default="B:USR1@120",
                   help="sbatch --signal: warn before the time limit so the loop checkpoints (default "
                        "B:USR1@120: SIGUSR1 to the batch script 120 s before the limit, which forwards it to "
                        "the learners); 'none' to disable")
    g.add_argument("--requeue", dest="requeue", action="store_true", default=None,
                   help="the job may be requeued (preemption, node failure, `scontrol requeue`), and re-queues "
                        "itself after the --signal warning so the run continues from its checkpoint")
    g.add_argument("--no-requeue", dest="requeue", action="store_false", help="never requeue")
    g.add_argument("--max-requeues", type=int, default=3,
                   help="self-requeues allowed after a --signal warning or the --save-by deadline "
                        "(SLURM_RESTART_COUNT; default 3)")
    g.add_argument("--save-by", type=float, metavar="MINUTES",
                   help="MINUTES after each (re)start of the job the learners checkpoint at the next step boundary "
                        "and stop (exported as OAPL_SAVE_BY_EPOCH, Unix seconds); with --requeue the job then "
                        "queues itself again. For clusters where the --signal warning does not arrive")
    g.add_argument("--master-port", type=int, help="rendezvous port of the learners (default: from the job id)")


def _add_environment_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("environment and containers")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="export KEY=VAL in the job (repeatable; overrides the defaults, e.g. "
                        "--env NCCL_SOCKET_IFNAME=ib0)")
    g.add_argument("--no-default-env", action="store_true",
                   help="do not export the default variables (" + ", ".join(DEFAULT_ENV) + "; the learner step's "
                        + ", ".join(DEFAULT_LEARNER_ENV) + ")")
    g.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run by the batch script before any step, e.g. 'module load cuda' or "
                        "'source /shared/venv/bin/activate' (repeatable)")
    g.add_argument("--python", help="Python on the compute nodes (default: this interpreter; `python` inside "
                   "a container)")
    g.add_argument("--workdir", help="directory the job runs in, holding launch/ and megatron_oapl/ "
                   f"(default: this repository, {REPO_ROOT})")
    g.add_argument("--container-image", help="pyxis/enroot image of every step (srun --container-image)")
    g.add_argument("--fleet-container-image", help="image of the fleet step (default: --container-image)")
    g.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST[,...]",
                   help="extra pyxis mounts (repeatable); the workdir, run_dir, a local model.hf_path and the "
                        "data / offline-dataset directories are always mounted at the same path")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _OverridesAnywhereParser(argparse.ArgumentParser):
    """Accepts `key=value` overrides after options too (`CONFIG --fleet-nodes 2 optim.lr=1e-5`): argparse
    alone takes positionals only as one contiguous run."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "overrides"):
            late = [a for a in extras if _OVERRIDE.match(a)]
            if late:
                namespace.overrides = [*(namespace.overrides or []), *late]
                extras = [a for a in extras if not _OVERRIDE.match(a)]
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    p = _OverridesAnywhereParser(prog="oapl launch slurm", description=__doc__.split("\n\n")[0],
                                epilog="See docs/cluster.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slurm_arguments(p)
    return p


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `launch` (with its `slurm` action) on the `oapl` command's subparsers."""
    launch = subparsers.add_parser("launch", help="submit a run to a cluster scheduler (SLURM)")
    sub = launch.add_subparsers(dest="launch_command", required=True, metavar="SCHEDULER",
                                parser_class=_OverridesAnywhereParser)
    slurm = sub.add_parser(
        "slurm", help="check, render and submit a SLURM job (heterogeneous learners + fleet, or a node split)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_slurm_arguments(slurm)
    slurm.set_defaults(func=run)
    return launch


# --------------------------------------------------------------------------------------------------
# The plan: every number the template needs, checked
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Component:
    role: str  # learner | fleet
    partition: str | None
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    account: str | None
    time: str | None
    sbatch_args: list[str]
    container_image: str | None

    @property
    def ntasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def cpus_per_node(self) -> int:
        return self.tasks_per_node * self.cpus_per_task


@dataclasses.dataclass
class Plan:
    mode: str  # het | homogeneous | single (no fleet nodes)
    job_name: str
    workdir: Path
    run_dir: Path
    python: str
    learner: Component
    fleet: Component | None
    fleet_mode: str
    engines_per_node: int
    num_engines: int
    env: dict[str, str]
    learner_env: dict[str, str]
    setup: list[str]
    signal: str | None
    requeue: bool | None
    max_requeues: int
    save_by_minutes: float | None
    master_port: int | None
    exclusive: bool
    container_mounts: list[str]
    config_yaml: str
    command_line: str
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def job_config(self) -> Path:
        return self.launch_dir / "config.yaml"

    @property
    def script_path(self) -> Path:
        return self.launch_dir / "sbatch.sh"

    @property
    def signal_name(self) -> str | None:
        """USR1 of `B:USR1@120` when the batch script receives it (the `B:` flag), else None."""
        if not self.signal:
            return None
        match = re.fullmatch(r"(?:R?B?R?:)?(?:SIG)?(\w+?)(?:@\d+)?", self.signal)
        flags = self.signal.split(":")[0] if ":" in self.signal else ""
        return match.group(1) if match and "B" in flags else None


def _pick(*values):
    return next((v for v in values if v is not None), None)


def _local_path_reason(path: Path) -> str | None:
    """Why `path` is probably node-local (a compute node would not see it), or None."""
    path = Path(os.path.abspath(path))
    prefixes = list(LOCAL_PREFIXES)
    if os.environ.get("TMPDIR"):
        prefixes.append(os.path.abspath(os.environ["TMPDIR"]))
    for prefix in prefixes:
        if path == Path(prefix) or Path(prefix) in path.parents:
            return f"under {prefix}"
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and (str(path) == parts[1] or str(path).startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, fstype = parts[1], parts[2]
    except OSError:
        return None
    if fstype in LOCAL_FS_TYPES:
        return f"on a {fstype} filesystem ({best})"
    return None


def _parse_env(items: list[str], errors: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            errors.append(f"--env={item!r} must look like KEY=VALUE (KEY a shell variable name)")
            continue
        env[key] = value
    return env


def _load_run_config(args, extra: list[str], errors: list[str]):
    from megatron_oapl.config import ConfigError, load_config

    try:
        return load_config(args.config, (*args.overrides, *extra), check_hardware=False)
    except ConfigError as err:
        errors.extend(f"config: {e}" for e in err.errors)
        return None


def _input_files(cfg) -> list[tuple[str, str, list[str], str]]:
    """(field, value, files the job will read, how to make them) for the config's input paths: the prompt
    files of data.source=jsonl|parquet, eval sets' files, the offline dataset, and a chat template /
    checkpoint.load given as a path that exists here."""
    out = []
    data = cfg.data
    if data.source in ("jsonl", "parquet") and data.path:
        splits = ("train", "eval") if data.num_eval_prompts > 0 else ("train",)
        if "{split}" in data.path:
            files = [data.path.replace("{split}", s) for s in splits]
        elif Path(data.path).expanduser().is_dir():
            files = [str(Path(data.path) / f"{s}.{data.source}") for s in splits]
        else:
            files = [data.path]
        out.append(("data.path", data.path, files, "make the train/eval files with `oapl data prepare`"))
    for name, spec in cfg.eval.sets.items():
        if spec.get("source") == "file" and spec.get("path"):
            out.append((f"eval.sets.{name}.path", spec["path"], [spec["path"]],
                        "make it with `oapl data prepare ... --bench`"))
    if cfg.lag.mode == "offline" and cfg.lag.offline_dataset:
        out.append(("lag.offline_dataset", cfg.lag.offline_dataset, [cfg.lag.offline_dataset],
                    "sample it first: `oapl generate CONFIG --out PATH`"))
    for name, value in (("data.chat_template", data.chat_template), ("checkpoint.load", cfg.checkpoint.load)):
        if value and Path(value).expanduser().exists():  # else a hub id / template name: left as it is
            out.append((name, value, [value], ""))
    return out


def _check_partition(comp: Component, count_nodes: int, cluster: ClusterInfo, *, part_opt: str, nodes_desc: str,
                     cpu_desc: str, gpu_opt: str, errors: list[str]) -> None:
    """The partition exists, is up, and has `count_nodes` nodes with the CPUs and GPUs asked per node."""
    if comp.partition not in cluster.partitions:
        existing = ", ".join(sorted(cluster.partitions)) or "none"
        errors.append(f"{part_opt}={comp.partition}: no such partition (existing: {existing})")
        return
    part = cluster.partitions[comp.partition]
    if part.state != "UP":
        errors.append(f"{part_opt}={comp.partition}: the partition is {part.state}, not UP")
    nodes = part.nodes
    if not nodes:
        errors.append(f"{part_opt}={comp.partition}: the partition has no nodes")
        return
    max_gpus = max(n.gpus for n in nodes)
    max_cpus = max(n.cpus for n in nodes)
    if comp.gpus_per_node > max_gpus:
        errors.append(f"{gpu_opt}={comp.gpus_per_node}: the nodes of partition {part.name} have at most "
                      f"{max_gpus} GPUs" + (" (CPU nodes: pass 0)" if max_gpus == 0 else ""))
    if comp.cpus_per_node > max_cpus:
        errors.append(f"{cpu_desc}: the nodes of partition {part.name} have at most {max_cpus} CPUs")
    fitting = [n for n in nodes if n.gpus >= comp.gpus_per_node and n.cpus >= comp.cpus_per_node]
    if comp.gpus_per_node <= max_gpus and comp.cpus_per_node <= max_cpus and len(fitting) < count_nodes:
        errors.append(f"{nodes_desc}: partition {part.name} has {len(fitting)} node(s) with >= "
                      f"{comp.cpus_per_node} CPUs and >= {comp.gpus_per_node} GPUs "
                      f"({', '.join(n.name for n in fitting) or 'none'})")


# make_plan runs the builders below in order; each appends to the same `errors`, so one run lists every
# problem at once, and the plan stops early only where a later step cannot go on without the earlier one.


@dataclasses.dataclass
class _Layout:
    """Where the job's parts go: the job mode, the fleet's mode and nodes, each component's partition."""

    mode: str  # het | homogeneous | single (no fleet nodes)
    fleet_mode: str  # external | local
    fleet_nodes: int
    offline: bool  # lag.mode=offline: the learners replay a dataset, no engines anywhere
    learner_partition: str | None
    fleet_partition: str | None


@dataclasses.dataclass
class _Paths:
    """The paths the compute nodes need, made absolute, and the config overrides that point the job at them."""

    run_dir: Path
    workdir: Path
    local_model: Path | None  # model.hf_path when it is a directory here (else a hub id)
    inputs: list[tuple[str, Path]]  # (config field, absolute path) of every input file or directory
    overrides: list[str]
    container: str | None
    python: str


def make_plan(args, cluster: ClusterInfo | None) -> Plan:
    """Check everything and compute the job's shape; raises LaunchError listing every problem."""
    errors: list[str] = []
    warnings: list[str] = []
    cfg = _load_run_config(args, [], errors)
    if cfg is None:
        raise LaunchError(errors)
    _check_option_ranges(args, errors)
    if errors:
        raise LaunchError(errors)
    layout = _layout(args, cfg, cluster, errors)
    learner = _learner_component(args, cfg, layout.learner_partition, cluster, errors)
    fleet, engines_per_node, num_engines = _fleet_component(args, cfg, layout, learner, cluster, errors)
    _check_cluster(args, cluster, layout.mode, learner, fleet, errors)
    paths = _resolve_paths(args, cfg, errors, warnings)
    _check_shared_paths(args, paths, errors)
    config_yaml = _job_config_yaml(args, layout.fleet_mode, num_engines, paths.overrides, errors)
    env, learner_env, signal = _environment(args, errors)
    launch_memory_check(cfg, args, learner.ntasks, learner.gpus_per_node, errors, warnings)
    if errors:
        raise LaunchError(errors)

    if layout.fleet_mode == "local" and learner.gpus_per_node > 0 and fleet is not None:
        warnings.append("--fleet-mode=local: the engines run on the learner nodes beside the coordinator (the fleet "
                        "nodes only record their placement); --fleet-mode=external runs them on the fleet nodes")
    return Plan(
        mode=layout.mode, job_name=args.job_name or f"oapl-{paths.run_dir.name}", workdir=paths.workdir,
        run_dir=paths.run_dir, python=paths.python, learner=learner, fleet=fleet, fleet_mode=layout.fleet_mode,
        engines_per_node=engines_per_node, num_engines=num_engines, env=env, learner_env=learner_env,
        setup=list(args.setup),
        signal=signal, requeue=args.requeue, max_requeues=args.max_requeues, save_by_minutes=args.save_by,
        master_port=args.master_port, exclusive=args.exclusive, container_mounts=_container_mounts(args, paths),
        config_yaml=config_yaml,
        command_line=" ".join(shlex.quote(a) for a in (getattr(args, "argv", None) or ["oapl", *sys.argv[1:]])),
        warnings=warnings,
    )


def _check_option_ranges(args, errors: list[str]) -> None:
    """Counts and sizes are not negative (nodes, ranks and CPUs at least 1)."""
    for opt in ("learner_nodes", "fleet_nodes", "learner_gpus_per_node", "fleet_gpus_per_node",
                "learner_tasks_per_node", "learner_cpus_per_task", "fleet_cpus_per_node", "max_requeues"):
        value = getattr(args, opt)
        minimum = 1 if opt in ("learner_nodes", "learner_tasks_per_node", "learner_cpus_per_task",
                               "fleet_cpus_per_node") else 0
        if value is not None and value < minimum:
            errors.append(f"--{opt.replace('_', '-')}={value} must be >= {minimum}")


def _layout(args, cfg, cluster: ClusterInfo | None, errors: list[str]) -> _Layout:
    """The job mode, the fleet's nodes and mode, and each component's partition (the cluster's default when
    none is given)."""
    homogeneous = args.homogeneous
    offline = cfg.lag.mode == "offline"
    fleet_nodes = args.fleet_nodes if args.fleet_nodes is not None else (0 if offline else 1)
    if offline and fleet_nodes > 0:
        errors.append(f"--fleet-nodes={fleet_nodes}: lag.mode='offline' runs no fleet (allowed: 0, the default "
                      "for offline runs; sample the dataset with `oapl generate` first)")
    # Fleet nodes that run no engines would idle for the whole job: with fleet nodes, the engines go there.
    fleet_mode = args.fleet_mode or ("external" if fleet_nodes > 0 else "local")
    mode = "single" if fleet_nodes == 0 else ("homogeneous" if homogeneous else "het")
    learner_partition = _pick(args.learner_partition, args.partition)
    fleet_partition = _pick(args.fleet_partition, args.partition)
    if cluster is not None:
        default = cluster.default_partition()
        if learner_partition is None:
            learner_partition = default
            if default is None:
                errors.append("--learner-partition is not given and the cluster has no default partition "
                              f"(existing: {', '.join(sorted(cluster.partitions)) or 'none'})")
        if fleet_partition is None:
            fleet_partition = learner_partition if homogeneous else default
    if homogeneous and args.fleet_partition and args.fleet_partition != learner_partition:
        errors.append(f"--fleet-partition={args.fleet_partition}: --homogeneous is one job in one partition "
                      f"({learner_partition}); drop --fleet-partition or the --homogeneous flag")
    return _Layout(mode, fleet_mode, fleet_nodes, offline, learner_partition, fleet_partition)


def _node_extreme(cluster: ClusterInfo | None, partition: str | None, attr: str, pick) -> int | None:
    """`pick` (max or min) of the nodes' `attr` (gpus, cpus) in `partition`; None without a cluster or nodes."""
    if cluster is None or partition not in cluster.partitions or not cluster.partitions[partition].nodes:
        return None
    return pick(getattr(n, attr) for n in cluster.partitions[partition].nodes)


def _learner_component(args, cfg, partition: str | None, cluster: ClusterInfo | None,
                       errors: list[str]) -> Component:
    """One learner rank per GPU (or --learner-tasks-per-node ranks on CPU nodes); the ranks fit TP x PP x DP."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    mp = tp * pp
    lg = _pick(args.learner_gpus_per_node, _node_extreme(cluster, partition, "gpus", max), 0)
    dp = cfg.parallel.data_parallel_size
    if lg > 0:
        ltpn = lg
        if args.learner_tasks_per_node is not None and args.learner_tasks_per_node != lg:
            errors.append(f"--learner-tasks-per-node={args.learner_tasks_per_node} must equal "
                          f"--learner-gpus-per-node={lg}: one learner rank per GPU")
    elif args.learner_tasks_per_node is not None:
        ltpn = args.learner_tasks_per_node
    else:
        want = mp * (dp or 1)
        ltpn = max(1, want // args.learner_nodes)
        if want % args.learner_nodes:
            errors.append(f"--learner-nodes={args.learner_nodes} must divide the {want} learner ranks "
                          f"(TP={tp} x PP={pp} x DP={dp or 1}) on CPU nodes, or pass --learner-tasks-per-node")
    world = args.learner_nodes * ltpn
    per = "GPUs" if lg > 0 else "ranks"
    per_opt = f"--learner-gpus-per-node={lg}" if lg > 0 else f"--learner-tasks-per-node={ltpn}"
    if world % mp:
        errors.append(f"parallel.tensor_model_parallel_size={tp} x parallel.pipeline_model_parallel_size={pp} = "
                      f"{mp} must divide the learner {per}: --learner-nodes={args.learner_nodes} x {per_opt} = "
                      f"{world}")
    else:
        from megatron_oapl.config import ConfigError, check_world_size

        try:
            check_world_size(cfg, world)
        except ConfigError as err:
            errors.extend(f"config, for {world} learner ranks (--learner-nodes={args.learner_nodes} x "
                          f"{per_opt}): {e}" for e in err.errors)
    lcpt = args.learner_cpus_per_task
    if lcpt is None:
        node_cpus = _node_extreme(cluster, partition, "cpus", min)
        lcpt = max(1, node_cpus // ltpn) if node_cpus else 1
    return Component("learner", partition, args.learner_nodes, ltpn, lcpt, lg,
                     _pick(args.learner_account, args.account), _pick(args.learner_time, args.time),
                     list(args.learner_sbatch_arg), args.container_image)


def _fleet_component(args, cfg, layout: _Layout, learner: Component, cluster: ClusterInfo | None,
                     errors: list[str]) -> tuple[Component | None, int, int]:
    """(fleet component or None, engines per fleet node, engines of the run): one fleet_node task per node,
    one engine per `engine TP` GPUs."""
    etp = cfg.fleet.engine_tensor_parallel_size
    lg = learner.gpus_per_node
    fleet = None
    engines_per_node = 0
    num_engines = cfg.fleet.num_engines
    if layout.fleet_nodes > 0:
        fg = _pick(args.fleet_gpus_per_node,
                   lg if args.homogeneous else _node_extreme(cluster, layout.fleet_partition, "gpus", max), 0)
        if args.homogeneous and fg != lg:
            errors.append(f"--fleet-gpus-per-node={fg} must equal --learner-gpus-per-node={lg} with --homogeneous "
                          "(one job allocates the same GPUs on every node)")
        if fg > 0:
            if fg % etp:
                divisors = ", ".join(str(d) for d in range(1, fg + 1) if fg % d == 0)
                errors.append(f"fleet.engine_tensor_parallel_size={etp} must divide --fleet-gpus-per-node={fg} "
                              f"(one engine per {etp} GPUs of a node; allowed engine TP: {divisors})")
            engines_per_node = max(1, fg // etp)
        else:
            engines_per_node = max(1, -(-cfg.fleet.num_engines // layout.fleet_nodes))
        fcpn = args.fleet_cpus_per_node
        if fcpn is None:
            fcpn = _node_extreme(cluster, layout.fleet_partition, "cpus", min) or 1
        fleet = Component("fleet", layout.fleet_partition, layout.fleet_nodes, 1, fcpn, fg,
                          _pick(args.fleet_account, args.account), _pick(args.fleet_time, args.time),
                          list(args.fleet_sbatch_arg), _pick(args.fleet_container_image, args.container_image))
        if layout.fleet_mode == "external":
            num_engines = layout.fleet_nodes * engines_per_node
    elif layout.fleet_mode == "external":
        errors.append("--fleet-mode=external needs fleet nodes (--fleet-nodes >= 1)")
    if layout.fleet_mode == "local" and not layout.offline and lg > 0:
        _check_local_engines(cfg, learner, errors)
    return fleet, engines_per_node, num_engines


def _check_local_engines(cfg, learner: Component, errors: list[str]) -> None:
    """--fleet-mode=local: the coordinator places its engines after the learners' GPUs (rollout/placement.py);
    refused here when the learner node has none left, as the job would refuse it at its start."""
    from megatron_oapl.config import ConfigError
    from megatron_oapl.rollout.placement import engine_gpu_slices

    lg = learner.gpus_per_node
    try:
        engine_gpu_slices(cfg.fleet.num_engines, cfg.fleet.engine_tensor_parallel_size,
                          [str(i) for i in range(lg)], learner.tasks_per_node)
    except ConfigError as err:
        errors.append(f"--fleet-mode=local with --learner-gpus-per-node={lg}: {err}")


def _check_cluster(args, cluster: ClusterInfo | None, mode: str, learner: Component, fleet: Component | None,
                   errors: list[str]) -> None:
    """Each component's partition has the nodes, CPUs and GPUs asked; pyxis is there for a container."""
    if cluster is None:
        if not args.dry_run:
            errors.append("--no-cluster-check is only allowed with --dry-run (a submission is always checked)")
        return
    learner_cpus = (f"--learner-cpus-per-task={learner.cpus_per_task} x {learner.tasks_per_node} rank(s) per "
                    f"node = {learner.cpus_per_node} CPUs per node")
    lopt = "--learner-partition" if args.learner_partition else "--partition"
    if mode == "homogeneous":
        # One job: every node must fit the bigger of the two components' per-node asks.
        both = dataclasses.replace(learner, cpus_per_task=max(learner.cpus_per_node, fleet.cpus_per_node),
                                   tasks_per_node=1)
        desc = (learner_cpus if learner.cpus_per_node >= fleet.cpus_per_node
                else f"--fleet-cpus-per-node={fleet.cpus_per_node}")
        _check_partition(both, learner.nodes + fleet.nodes, cluster, part_opt=lopt, cpu_desc=desc,
                         nodes_desc=f"--learner-nodes={learner.nodes} + --fleet-nodes={fleet.nodes}",
                         gpu_opt="--learner-gpus-per-node", errors=errors)
    else:
        _check_partition(learner, learner.nodes, cluster, part_opt=lopt, cpu_desc=learner_cpus,
                         nodes_desc=f"--learner-nodes={learner.nodes}", gpu_opt="--learner-gpus-per-node",
                         errors=errors)
        if fleet is not None:
            _check_partition(fleet, fleet.nodes, cluster,
                             part_opt="--fleet-partition" if args.fleet_partition else "--partition",
                             cpu_desc=f"--fleet-cpus-per-node={fleet.cpus_per_node}",
                             nodes_desc=f"--fleet-nodes={fleet.nodes}", gpu_opt="--fleet-gpus-per-node",
                             errors=errors)
    if (args.container_image or args.fleet_container_image) and not cluster.pyxis:
        errors.append(f"--container-image={args.container_image or args.fleet_container_image}: srun has no "
                      "--container-image option here (the pyxis SPANK plugin is not loaded); drop the option "
                      "or ask the admins for pyxis/enroot")


def _resolve_paths(args, cfg, errors: list[str], warnings: list[str]) -> _Paths:
    """run_dir, the workdir, a local model and the input files, made absolute (the job runs in --workdir, not
    where this command was typed); the inputs must exist (a warning only with --dry-run)."""
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else REPO_ROOT
    if not (workdir / "launch" / "srun_env.py").is_file():
        errors.append(f"--workdir={workdir} does not hold launch/srun_env.py (the repository root does)")
    hf_path = cfg.model.hf_path
    overrides = [f"run_dir={json.dumps(str(run_dir))}"]
    local_model = None
    if hf_path and Path(hf_path).expanduser().exists():
        local_model = Path(hf_path).expanduser().resolve()
        overrides.append(f"model.hf_path={json.dumps(str(local_model))}")
    inputs: list[tuple[str, Path]] = []
    for name, value, files, hint in _input_files(cfg):
        absolute = Path(os.path.abspath(os.path.expanduser(value)))
        if str(absolute) != value:
            overrides.append(f"{name}={json.dumps(str(absolute))}")
        inputs.append((name, absolute))
        missing = [os.path.abspath(os.path.expanduser(f)) for f in files if not Path(f).expanduser().exists()]
        if missing:
            verb = "does" if len(missing) == 1 else "do"
            problem = f"{name}={value}: {', '.join(missing)} {verb} not exist here ({hint})"
            if args.dry_run:
                warnings.append(problem + "; the job would fail at its start")
            else:
                errors.append(problem)
    container = args.container_image or args.fleet_container_image
    python = args.python or ("python" if container else sys.executable)
    return _Paths(run_dir, workdir, local_model, inputs, overrides, container, python)


def _check_shared_paths(args, paths: _Paths, errors: list[str]) -> None:
    """Every path the compute nodes read is on a shared filesystem (unless --allow-local-paths)."""
    if args.allow_local_paths:
        return
    checks = [("run_dir", paths.run_dir), ("--workdir", paths.workdir)]
    if paths.local_model:
        checks.append(("model.hf_path", paths.local_model))
    checks += paths.inputs
    if not paths.container and os.path.isabs(paths.python):
        checks.append(("--python", Path(paths.python)))
    for name, path in checks:
        reason = _local_path_reason(path)
        if reason:
            errors.append(f"{name}={path} is {reason}, which compute nodes do not share: use a path on a "
                          "shared filesystem, or pass --allow-local-paths if the login node is the compute "
                          "node")


def _job_config_yaml(args, fleet_mode: str, num_engines: int, overrides: list[str], errors: list[str]) -> str:
    """The job config (resolved, absolute paths; what every rank trains with) as YAML; "" when it is invalid."""
    overrides = list(overrides)
    if fleet_mode == "external":
        overrides += ["fleet.external=true", f"fleet.num_engines={num_engines}"]
        import importlib.util

        if importlib.util.find_spec("megatron_oapl.rollout.fleet_node") is None:
            errors.append("--fleet-mode=external needs megatron_oapl.rollout.fleet_node, which this version does "
                          "not have (use --fleet-mode=local)")
    job_cfg = _load_run_config(args, overrides, errors)
    if job_cfg is None:
        return ""
    from megatron_oapl.config import to_yaml

    return to_yaml(job_cfg, docs=True)


def _environment(args, errors: list[str]) -> tuple[dict[str, str], dict[str, str], str | None]:
    """(job env, learner-step env, --signal or None): the defaults under --env; the signal and --save-by
    checked."""
    env_errors: list[str] = []
    env = {} if args.no_default_env else dict(DEFAULT_ENV)
    env.update(_parse_env(args.env, env_errors))
    learner_env = {k: v for k, v in ({} if args.no_default_env else DEFAULT_LEARNER_ENV).items() if k not in env}
    errors += env_errors
    signal = None if (args.signal or "").lower() in ("", "none") else args.signal
    if signal and not re.fullmatch(r"(?:[RB]{1,2}:)?(?:SIG)?[A-Z0-9]+(?:@\d+)?", signal):
        errors.append(f"--signal={signal} must look like [B:]SIGNAL[@SECONDS], e.g. B:USR1@120")
    if args.save_by is not None and args.save_by <= 0:
        errors.append(f"--save-by={args.save_by} must be > 0 minutes")
    return env, learner_env, signal


def _container_mounts(args, paths: _Paths) -> list[str]:
    """pyxis mounts: the workdir, run_dir, a local model and the inputs' directories at the same path (none
    nested in another), then --container-mounts."""
    if not paths.container:
        return []
    mounts = []
    input_dirs = [p if Path(p).is_dir() else p.parent for _, p in paths.inputs]
    mounted: list[Path] = []
    candidates = (paths.workdir, paths.run_dir, paths.local_model, *input_dirs)
    for path in dict.fromkeys(p for p in candidates if p is not None):
        if not any(m == path or m in path.parents for m in mounted):  # inside a mount already
            mounted.append(path)
            mounts.append(f"{path}:{path}")
    for item in args.container_mounts:
        mounts += [m for m in item.split(",") if m]
    return mounts


# --------------------------------------------------------------------------------------------------
# Rendering and submission
# --------------------------------------------------------------------------------------------------


def render(plan: Plan) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    name = "sbatch_het.sh.j2" if plan.mode == "het" else "sbatch_homogeneous.sh.j2"
    return env.get_template(name).render(
        plan=plan, learner=plan.learner, fleet=plan.fleet, log_dir=plan.log_dir,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), template=name,
        learner_binding=" ".join(LEARNER_GPU_BINDING) if plan.learner.gpus_per_node > 0 else "",
    )


def test_only(script: str) -> None:
    """`sbatch --test-only`: SLURM's own check of the script (partition, account, QOS, time, resources)."""
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise LaunchError([f"sbatch --test-only refused the job: {message}"])


def submit(plan: Plan, script: str) -> str:
    """Write the job config and script into RUN_DIR/launch, submit, record the job id."""
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    plan.job_config.write_text(plan.config_yaml)
    plan.script_path.write_text(script)
    plan.script_path.chmod(0o755)
    proc = subprocess.run(["sbatch", "--parsable", str(plan.script_path)], capture_output=True, text=True,
                          timeout=120, cwd=plan.workdir)
    if proc.returncode != 0:
        raise LaunchError([f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}"])
    job_id = proc.stdout.strip().split(";")[0]
    (plan.launch_dir / "job_id").write_text(job_id + "\n")
    return job_id


def describe(plan: Plan, job_id: str) -> str:
    stem = plan.log_dir / f"{plan.job_name}-{job_id}"
    parts = [f"learners: {plan.learner.nodes} node(s) x {plan.learner.tasks_per_node} rank(s) on "
             f"{plan.learner.partition}"]
    if plan.fleet is not None:
        parts.append(f"fleet: {plan.fleet.nodes} node(s) on {plan.fleet.partition} ({plan.fleet_mode})")
    return "\n".join([
        f"submitted job {job_id} ({plan.mode}; {'; '.join(parts)})",
        f"  script:  {plan.script_path}",
        f"  config:  {plan.job_config}",
        f"  logs:    {stem}.out  {stem}-learner.out" + (f"  {stem}-fleet.out" if plan.fleet else ""),
        f"  watch:   squeue -j {job_id}; tail -f {stem}-learner.out; "
        f"tensorboard --logdir {plan.run_dir / 'tensorboard'}",
    ])


def run(args) -> int:
    """The `oapl launch slurm` action: check, render, then print (--dry-run) or submit."""
    try:
        cluster = None if args.no_cluster_check else query_cluster()
        plan = make_plan(args, cluster)
        script = render(plan)
        if cluster is not None:
            test_only(script)
    except LaunchError as err:
        for e in err.errors:
            print(f"error: {e}", file=sys.stderr)
        print("nothing was submitted", file=sys.stderr)
        return 2
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    try:
        job_id = submit(plan, script)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(plan, job_id))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["oapl", "launch", "slurm", *argv]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
