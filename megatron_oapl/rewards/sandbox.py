"""Run one model-written Python program fenced, as `rewards.code_sandbox` says: "bwrap" or "rlimits-only".

    sandbox = Sandbox("bwrap")          # ValueError naming rewards.code_sandbox when bubblewrap is unusable
    status = sandbox.run("solution.py", stdin_file, stdout_file, cpu_s=5, mem_bytes=512 << 20, wall_s=11)
    # exit status, or None when the wall-clock limit killed it

Both kinds (every run is a fresh process):
- rlimits set by a tiny bootstrap (`_BOOT`) that then execs `python -I -S program`: RLIMIT_CPU (soft =
  hard, so SIGKILL at the limit, which a PID 1 could not ignore), RLIMIT_AS (memory), RLIMIT_FSIZE
  (`MAX_OUTPUT_BYTES`), no core files. A bootstrap, not a `preexec_fn`: rewards may run beside threads (the
  reward pool's dispatcher thread), and Python documents `preexec_fn` as unsafe when threads exist;
- an environment of PATH, LANG and HOME only (no proxies, no credentials); stderr discarded;
- a wall-clock limit; after every run, timed out or not, the runner's whole process group is SIGKILLed.

"bwrap" (bubblewrap, Debian package `bubblewrap`) adds the isolation:
- a fresh root holding only read-only binds of /usr, /bin, /lib*, /etc/ld.so.cache and the interpreter's
  own prefix (pyenv and conda keep it outside /usr): no run directory, no /root or /home, no /etc/shadow;
- a private tmpfs on /tmp, also HOME and the cwd, with the program bound read-only into it;
- new network (loopback only, not the host's), PID, IPC and UTS namespaces, a new session, and
  "die with parent": when the runner is killed the kernel kills every process the program forked;
- RLIMIT_NPROC (`MAX_PROCESSES`) bounds a fork bomb. The kernel never applies it to root, so as root
  the program runs as a uid of its own (`_private_uid`: nobody else's processes count against it), which
  leaves it no capabilities and no way back (bubblewrap sets no_new_privs); as another user, in a user
  namespace with every capability dropped, where the kernel counts only the sandbox's processes.
`Sandbox("bwrap")` probes the exact command once per process (as root both ways, the uid switch first:
it fails inside containers whose user namespace maps no other uid) and raises if neither runs.

"rlimits-only" is the weaker fence a user must opt into: the program runs as the run's user, in a temp
dir, and can read and write that user's files and reach the network.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO

__all__ = ["SANDBOXES", "MAX_OUTPUT_BYTES", "MAX_PROCESSES", "Sandbox", "sandbox_problem"]

SANDBOXES = ("bwrap", "rlimits-only")
MAX_OUTPUT_BYTES = 16 << 20
MAX_PROCESSES = 16  # per program under bwrap, itself included: a fork bomb stops here

_FIELD = "rewards.code_sandbox"
_OPT_OUT = (f"(allowed: install bubblewrap, e.g. `apt-get install bubblewrap`; or {_FIELD}='rlimits-only' "
            "to run model-written code with resource limits only, as this user, with its files and network)")

# Runs as `python -I -S -c _BOOT cpu_s mem_bytes fsize nproc uid program`; nproc/uid -1 = leave as is.
_BOOT = (
    "import os, resource, sys\n"
    "cpu, mem, fsize, nproc, uid = map(int, sys.argv[1:6])\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "if nproc >= 0:\n"
    "    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))\n"
    "if uid >= 0:\n"
    "    os.setgroups([])\n"
    "    os.setresgid(uid, uid, uid)\n"
    "    os.setresuid(uid, uid, uid)\n"
    "os.execv(sys.executable, [sys.executable, '-I', '-S', sys.argv[6]])\n"
)

_TEARDOWN_S = 10.0  # at most this long for the kernel to end a sandbox's processes
_INSIDE_TMP = "/tmp"
_INSIDE_PROGRAM = "/tmp/solution.py"
_uid_counter = itertools.count()


def _private_uid() -> int:
    """A uid no other live sandbox uses: 0x60000000 + (this pid << 8) + a per-process counter.

    Pids of live processes are distinct, so concurrent sandboxes of different scorers never share a uid and
    RLIMIT_NPROC counts one program's processes only; 256 concurrent runs in one process before reuse.
    """
    return 0x60000000 + ((os.getpid() & 0x3FFFFF) << 8) + (next(_uid_counter) & 0xFF)


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home}


def _interpreter() -> tuple[str, list[str]]:
    """(the real interpreter binary, the directories outside /usr it needs); a venv resolves to its base."""
    python = os.path.realpath(sys.executable)
    dirs = []
    for path in (os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python))):
        if path not in ("/", "/usr") and not path.startswith("/usr/") and path not in dirs:
            dirs.append(path)
    return python, dirs


def _bwrap_args(bwrap: str, program: str, as_root: bool) -> list[str]:
    """The bubblewrap command line up to the interpreter (see the module docstring)."""
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session"]
    if as_root:  # keep only what the bootstrap needs to switch uid; the switch then clears them
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--cap-drop", "ALL"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--perms", "0755", "--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    made: set[str] = set()
    for path in _interpreter()[1]:
        # Parents are made searchable by all: bubblewrap makes them 0700, and the program may run as
        # another uid.
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", _INSIDE_TMP,
             "--ro-bind", program, _INSIDE_PROGRAM, "--chdir", _INSIDE_TMP]
    return args


class Sandbox:
    """Runs programs with the fence named by `kind` (one of `SANDBOXES`); `bwrap` locates bubblewrap."""

    def __init__(self, kind: str = "bwrap", bwrap: str = "bwrap"):
        if kind not in SANDBOXES:
            raise ValueError(f"{_FIELD}={kind!r} must be one of: {', '.join(SANDBOXES)}")
        self.kind = kind
        self.bwrap, self.as_root = "", False
        if kind == "bwrap":
            problem, self.bwrap, self.as_root = _probe_bwrap(bwrap)
            if problem:
                raise ValueError(f"{_FIELD}='bwrap' needs bubblewrap, and {problem} {_OPT_OUT}")

    def run(self, program: str, stdin: IO, stdout: IO, cpu_s: int, mem_bytes: int, wall_s: float,
            stderr: IO | int = subprocess.DEVNULL) -> int | None:
        """Exit status of `program` (a file) reading `stdin` and writing `stdout` (files, not pipes: no
        buffer to fill); None when it ran past `wall_s` seconds and was killed."""
        bwrap = self.bwrap if self.kind == "bwrap" else None
        return _run(_command(bwrap, self.as_root, program, cpu_s, mem_bytes), program, bwrap is not None,
                    stdin, stdout, stderr, wall_s)


def sandbox_problem(kind: str, bwrap: str = "bwrap") -> str | None:
    """Why `Sandbox(kind, bwrap)` refuses to start here (one line naming rewards.code_sandbox), or None."""
    try:
        Sandbox(kind, bwrap)
    except ValueError as e:
        return str(e)
    return None


def _command(bwrap: str | None, as_root: bool, program: str, cpu_s: int, mem_bytes: int) -> list[str]:
    """The runner's command line: bubblewrap's part when `bwrap` is a path, then the bootstrap."""
    python = _interpreter()[0]
    if bwrap is None:  # as root RLIMIT_NPROC is not applied; as a user it would count all their processes
        prefix, inside, nproc, uid = [], program, -1, -1
    else:
        prefix, inside = _bwrap_args(bwrap, program, as_root), _INSIDE_PROGRAM
        nproc, uid = MAX_PROCESSES, (_private_uid() if as_root else -1)
    return [*prefix, python, "-I", "-S", "-c", _BOOT, str(cpu_s), str(mem_bytes), str(MAX_OUTPUT_BYTES),
            str(nproc), str(uid), inside]


def _run(cmd: list[str], program: str, isolated: bool, stdin: IO, stdout: IO, stderr: IO | int,
         wall_s: float) -> int | None:
    """Run `cmd` in a new session; SIGKILL its process group when it exits or at `wall_s` (then None).
    Under bubblewrap, return only once every process of the sandbox is gone."""
    home = _INSIDE_TMP if isolated else os.path.dirname(program)
    info_r, info_w = os.pipe() if isolated else (-1, -1)
    if isolated:  # bubblewrap writes the host pid of the sandbox's PID 1 there, then closes it
        cmd = [cmd[0], "--info-fd", str(info_w), *cmd[1:]]
    try:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd=os.path.dirname(program),
                                env=_env(home), start_new_session=True, close_fds=True,
                                pass_fds=(info_w,) if isolated else ())
    finally:
        if isolated:
            os.close(info_w)
    init_fd = _sandbox_init(info_r) if isolated else None
    # Wait WITHOUT reaping (WNOWAIT): while the exited runner is a zombie its pid, which is also the id of
    # its process group, cannot be reused, so the killpg below only hits the program's own leftovers.
    deadline = time.monotonic() + wall_s
    delay, timed_out = 0.001, False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    status = proc.wait()
    if init_fd is not None:
        # The sandbox's PID 1 dies with the runner ("die with parent"), but asynchronously; the kernel
        # reports its exit only after every other process of its PID namespace is gone.
        select.select([init_fd], [], [], _TEARDOWN_S)
        os.close(init_fd)
    return None if timed_out else status


def _sandbox_init(info_fd: int) -> int | None:
    """A pidfd of the sandbox's PID 1, from bubblewrap's --info-fd JSON (None if it exited first)."""
    with os.fdopen(info_fd, "rb") as f:
        data = f.read()
    try:
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    except (ValueError, KeyError, OSError):
        return None


def _probe_bwrap(bwrap: str) -> tuple[str | None, str, bool]:
    """(why bubblewrap cannot fence programs here or None, its path, whether to run it the as-root way)."""
    path = shutil.which(bwrap)
    if path is None:
        where = "" if os.sep in bwrap else " on PATH"
        return f"`{bwrap}` is not installed here (not found{where})", "", False
    return _probe_path(path)


@functools.lru_cache(maxsize=8)
def _probe_path(path: str) -> tuple[str | None, str, bool]:
    """`_probe_bwrap` for an existing binary: run a tiny program the way real ones run (cached per path)."""
    why = ""
    for as_root in ([True, False] if os.geteuid() == 0 else [False]):
        with tempfile.TemporaryDirectory(prefix="oapl-bwrap-probe-") as tmp:
            program = os.path.join(tmp, "probe.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write("print(6 * 7)\n")
            os.chmod(program, 0o644)
            with open(os.devnull, "rb") as fin, open(os.path.join(tmp, "out"), "w+b") as fout, \
                    open(os.path.join(tmp, "err"), "w+b") as ferr:
                try:
                    status = _run(_command(path, as_root, program, 10, 512 << 20), program, True,
                                  fin, fout, ferr, wall_s=30.0)
                except OSError as e:
                    status, why = -1, str(e)
                fout.seek(0)
                ferr.seek(0)
                if status == 0 and fout.read().strip() == b"42":
                    return None, path, as_root
                lines = ferr.read().decode("utf-8", "replace").strip().splitlines()
                why = lines[-1] if lines else (why or f"exit status {status}")
    return f"`{path}` cannot create its sandbox here ({why})", path, False
