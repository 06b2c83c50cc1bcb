"""A real two-node SLURM cluster on this one machine, for integration tests.

    cluster = SlurmCluster(tmp_dir)      # writes munge key, slurm.conf, cgroup.conf, plugstack.conf
    cluster.start()                      # munged, slurmctld, slurmd -N node1, slurmd -N node2; waits for idle
    subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points at this cluster
    cluster.stop()                       # cancels jobs, stops every daemon by its pid file

Everything lives under the given directory: a private munged (its own key and socket, so a system munged
is neither needed nor touched), the controller's state, the spool, logs and pid files of each daemon.
Both nodes share the machine's short hostname (`NodeHostname`), `NodeAddr=127.0.0.1` and differ by
`Port=`; each slurmd is started with `-N <node>`. A heterogeneous job's components never share a node, so
two nodes are the minimum for het jobs (see shared/docs/SLURM-ON-ONE-MACHINE.md).

Partitions: `debug` (default, both nodes), `learners` (node1), `fleet` (node2); so a het job whose
components name `learners` and `fleet` lands exactly as on a cluster with two node types.

Daemons are stopped by the pids in their pid files, never by name: other clusters (other test sessions,
a real slurmd) may run on the same machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_daemon(name: str) -> str | None:
    """Path of a SLURM/munge daemon (they live in sbin, which is not always on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def missing_requirements() -> str | None:
    """Why a local cluster cannot be started here (None when it can): the reason for pytest.skip."""
    need = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge"}
    missing = [f"{exe} (Debian package {pkg})" for exe, pkg in need.items() if not find_daemon(exe)]
    missing += [f"{exe} (Debian package slurm-client)" for exe in ("sbatch", "sinfo", "scontrol", "squeue")
                if not shutil.which(exe)]
    if missing:
        return ("a local SLURM cluster needs " + ", ".join(missing)
                + ": apt-get install -y slurm-wlm munge (as root)")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs job steps as the submitting user)"
    return None


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Node:
    name: str
    cpus: int = 1
    memory_mb: int = 1024


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all under `root`; see the module docstring."""

    def __init__(self, root: Path, nodes: tuple[Node, ...] = (Node("node1"), Node("node2")),
                 cluster_name: str = "oapltest", start_timeout_s: float = 60.0,
                 cred_expire_s: int = 5):
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cluster_name = cluster_name
        self.start_timeout_s = start_timeout_s
        self.cred_expire_s = cred_expire_s
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self._started: list[Path] = []  # pid files of the daemons this object started

    # -- configuration ---------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, sinfo, ...): this cluster's SLURM_CONF, and no
        SLURM_* variables of an enclosing job (sbatch would read them as options)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def write_config(self) -> None:
        for d in ("etc", "state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable key and socket directories.
        os.chmod(self.munge_dir, 0o700)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            "MailProg=/bin/true",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: plain /proc process tracking, no task binding (works in containers/gVisor).
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # Het jobs are started only by the backfill scheduler: run it every second.
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000,"
            "batch_sched_delay=1,bf_resolution=60",
            "ReturnToService=2",
            "MpiDefault=none",
            # Keep finished jobs visible to `scontrol show job` (there is no accounting database).
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            "JobRequeue=1",
            f"PlugStackConfig={r}/etc/plugstack.conf",  # not /etc/slurm's (spank plugins such as pyxis)
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node.name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={node.cpus} RealMemory={node.memory_mb} State=UNKNOWN")
        names = [n.name for n in self.nodes]
        lines.append(f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP")
        lines.append(f"PartitionName=learners Nodes={names[0]} MaxTime=INFINITE State=UP")
        if len(names) > 1:
            lines.append(f"PartitionName=fleet Nodes={','.join(names[1:])} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "etc" / "plugstack.conf").write_text("")
        # Only read by cgroup plugins (none configured); present so no system file is picked up.
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    # -- daemons ---------------------------------------------------------------------------------

    def _daemon(self, cmd: list[str], pid_file: Path, log: Path) -> None:
        with open(log, "ab") as out:
            proc = subprocess.run(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}:\n{self._tail(log)}")
        deadline = time.monotonic() + 15
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} wrote no pid file {pid_file}; see {log}:\n{self._tail(log)}")
            time.sleep(0.1)
        self._started.append(pid_file)

    @staticmethod
    def _tail(path: Path, n: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> "SlurmCluster":
        """Start every daemon and wait for idle nodes; on failure, stop what was started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.write_config()
        m = self.munge_dir
        self._daemon([find_daemon("munged"), f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                      f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
                      "--force"], m / "munged.pid", self.log_dir / "munged.out")
        self._daemon([find_daemon("slurmctld"), "-f", str(self.conf), "-i"], self.root / "slurmctld.pid",
                     self.log_dir / "slurmctld.out")
        for node in self.nodes:
            self._daemon([find_daemon("slurmd"), "-N", node.name, "-f", str(self.conf)],
                         self.root / f"slurmd-{node.name}.pid", self.log_dir / f"slurmd-{node.name}.out")
        self.wait_idle()

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                             text=True, timeout=30)
        states = {}
        for line in out.stdout.splitlines():
            name, _, state = line.partition(" ")
            states[name] = state.strip()
        return states

    def wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        want = {n.name for n in self.nodes}
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if want <= {n for n, s in states.items() if s == "idle"}:
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{self._tail(p, 15)}" for p in sorted(self.log_dir.glob("*.log")))
        raise RuntimeError(f"nodes not idle after {self.start_timeout_s:.0f} s: {states}\n{logs}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, by their pid files."""
        ctld = self.root / "slurmctld.pid"
        if ctld in self._started and _pid_alive(int(ctld.read_text().strip() or 0)):
            try:  # jobs first: slurmstepd and the job's processes outlive a stopped slurmd
                subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=self.env, capture_output=True,
                               timeout=30)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.queue():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        # slurmds and slurmctld together (each takes ~1-2 s to shut down), munged after them.
        munged = [p for p in self._started if p.name == "munged.pid"]
        self._terminate([p for p in self._started if p not in munged])
        self._terminate(munged)
        self._started.clear()

    @staticmethod
    def _terminate(pid_files: list[Path], timeout_s: float = 15.0) -> None:
        pids = []
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
        deadline = time.monotonic() + timeout_s
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries ---------------------------------------------------------------------------------

    def queue(self) -> list[str]:
        """Ids of the jobs still in the queue (pending, running, completing, requeued)."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                             timeout=30)
        return out.stdout.split()

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` fields of a job (all components of a het job: the first record wins, i.e.
        the leader's), e.g. {'JobState': 'COMPLETED', 'ExitCode': '0:0', 'Restarts': '1', ...}."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True,
                             text=True, timeout=30)
        records = []
        for line in out.stdout.splitlines():
            fields = {}
            for item in line.split():
                key, sep, value = item.partition("=")
                if sep and key not in fields:
                    fields[key] = value
            records.append(fields)
        if not records:
            return {}
        job = dict(records[0])
        job["components"] = [r.get("JobState", "") for r in records]  # type: ignore[assignment]
        return job

    def nudge(self) -> None:
        """Make the backfill scheduler run now. It only runs after a job/node/partition change, and it is
        the only scheduler that starts het jobs: a requeued job that just became eligible (after
        `cred_expire`) would otherwise wait for the next periodic state change (~30 s). A no-op
        partition update counts as a change."""
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], env=self.env,
                       capture_output=True, timeout=30)

    def wait_job(self, job_id: str | int, timeout_s: float, states=("COMPLETED", "FAILED", "CANCELLED",
                 "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict:
        """Wait until every component of the job reached a final state; returns `job()`."""
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            comps = info.get("components") or []
            if comps and all(c in states for c in comps):
                return info
            if "PENDING" in comps:
                self.nudge()
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f} s: {info}")
