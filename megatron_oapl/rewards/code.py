"""`code` reward: run the completion's Python program on stdin/stdout test cases in a fenced subprocess.

    prompt.metadata["tests"] = [{"input": "1 2\\n", "output": "3\\n"}, ...]
    optional: metadata["time_limit_s"] (CPU seconds per test, default 5),
              metadata["memory_limit_mb"] (address space, default 512)

The program is the last ```python (or ```py / bare ```) fenced block of the completion, else the whole
text. Reward = fraction of test cases whose stdout matches the expected output after normalisation
(surrounding whitespace stripped, trailing whitespace of each line dropped) with exit status 0; 1.0 only
if all pass (`binarize` turns partial credit into 0).

What fences the program (each test case is a fresh process):
- a fresh temporary directory as cwd, removed afterwards; stdin/stdout are files there (no pipe
  buffers to fill), stderr is discarded;
- `python -I -S` (isolated mode: no user site, no PYTHON* variables, no cwd on sys.path; no site);
- an environment reduced to PATH=/usr/bin:/bin, LANG, HOME=<temp dir> (no proxies, no credentials);
- rlimits set by a tiny bootstrap (`_BOOT`) that then execs the program: RLIMIT_CPU (soft = hard, so
  SIGKILL at the limit: as PID 1 of its namespace the program would ignore SIGXCPU), RLIMIT_AS
  (memory), RLIMIT_FSIZE (16 MiB of output), no core files.
  The bootstrap replaces a `preexec_fn`: rewards run in `RewardScorer`'s worker threads, and Python
  documents `preexec_fn` as unsafe (possible deadlock in the child) when threads exist.
  RLIMIT_NPROC is not set: it counts every process of the user (root here, which it does not even
  bind), so it would not bound this program alone; the process-group/PID-namespace kill below does;
- a wall-clock limit (2 x CPU limit + 1 s); after every run (timed out or not) the whole process group
  (`start_new_session`) is SIGKILLed, so children the program forked do not outlive it;
- no network and a private PID space when `unshare --net --pid --kill-child` works for this user (probed
  once and cached, see `sandbox_mode()`): the program sees only a loopback that is down, and when the
  runner is killed the kernel kills every process the program forked. Otherwise `unshare --net` alone;
  otherwise (no unshare / not permitted) only the limits above apply and the program CAN reach the
  network — `sandbox_mode()` says which, and a warning is logged once.

This is a resource fence for model-written code, not a security boundary against a hostile program: it
runs as the same user (dropping to `nobody` is not possible where the interpreter lives under a private
home directory) and can read that user's files.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from megatron_oapl.rewards.registry import register_reward
from megatron_oapl.rollout.types import Prompt

__all__ = ["code_reward", "extract_program", "run_tests", "sandbox_mode", "normalize_output"]

logger = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_MEMORY_LIMIT_MB = 512
MAX_OUTPUT_BYTES = 16 << 20

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", flags=re.DOTALL | re.IGNORECASE)

# Runs as `python -I -S -c _BOOT cpu_s mem_bytes fsize program.py`: set the limits, then become the program.
_BOOT = (
    "import os, resource, sys\n"
    "cpu, mem, fsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "os.execv(sys.executable, [sys.executable, '-I', '-S', sys.argv[4]])\n"
)


def extract_program(completion: str) -> str:
    """The last fenced python block of the completion, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalize_output(text: str) -> str:
    """Stripped, with trailing whitespace removed from every line (line endings unified)."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home}


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """How programs are fenced here: "netns+pidns", "netns" or "rlimits-only" (probed once, cached)."""
    unshare = _unshare()
    if unshare is not None:
        for mode, flags in (("netns+pidns", ["--net", "--pid", "--kill-child"]), ("netns", ["--net"])):
            try:
                r = subprocess.run([unshare, *flags, sys.executable, "-I", "-S", "-c", "pass"],
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=10, env=_env("/"))
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                return mode
    logger.warning("code reward: `unshare --net` is not available to this user; programs run with "
                   "resource limits only and can reach the network")
    return "rlimits-only"


def _unshare() -> str | None:
    return shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _prefix() -> list[str]:
    mode = sandbox_mode()
    if mode == "netns+pidns":
        return [_unshare() or "unshare", "--net", "--pid", "--kill-child"]
    if mode == "netns":
        return [_unshare() or "unshare", "--net"]
    return []


def _run_one(workdir: str, stdin_text: str, cpu_s: int, mem_bytes: int,
             wall_s: float) -> tuple[int | None, str]:
    """(exit status, or None on a wall-clock timeout; stdout) of solution.py on one input."""
    in_path, out_path = os.path.join(workdir, "stdin.txt"), os.path.join(workdir, "stdout.txt")
    with open(in_path, "w", encoding="utf-8") as f:
        f.write(stdin_text)
    cmd = [*_prefix(), sys.executable, "-I", "-S", "-c", _BOOT, str(cpu_s), str(mem_bytes),
           str(MAX_OUTPUT_BYTES), os.path.join(workdir, "solution.py")]
    with open(in_path, "rb") as fin, open(out_path, "wb") as fout:
        proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=subprocess.DEVNULL, cwd=workdir,
                                env=_env(workdir), start_new_session=True, close_fds=True)
        # Wait WITHOUT reaping (WNOWAIT): while the exited runner is a zombie its pid, which is also the
        # id of its process group, cannot be reused, so the killpg below can only hit the program's own
        # leftovers (children it forked), never an unrelated process.
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
    with open(out_path, "rb") as f:
        out = f.read(MAX_OUTPUT_BYTES + 1).decode("utf-8", errors="replace")
    return (None if timed_out else status), out


def run_tests(program: str, tests: list[dict[str, Any]], time_limit_s: float = DEFAULT_TIME_LIMIT_S,
              memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB) -> list[bool]:
    """Pass/fail of `program` on each {"input", "output"} test case (see the module docstring)."""
    cpu_s = max(1, int(round(time_limit_s)))
    wall_s = 2 * time_limit_s + 1.0
    mem_bytes = int(memory_limit_mb) << 20
    workdir = tempfile.mkdtemp(prefix="oapl-code-")
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(program)
        results = []
        for case in tests:
            status, out = _run_one(workdir, str(case.get("input", "")), cpu_s, mem_bytes, wall_s)
            results.append(status == 0 and normalize_output(out) == normalize_output(str(case["output"])))
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@register_reward("code")
def code_reward(completion_text: str, prompt: Prompt) -> float:
    """Fraction of prompt.metadata["tests"] the completion's program passes (1.0 = all)."""
    meta = prompt.metadata or {}
    tests = meta.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"prompt {prompt.prompt_id} has no metadata['tests'] (a non-empty list of "
                         "{'input': str, 'output': str}); the code reward needs test cases")
    for i, case in enumerate(tests):
        if not isinstance(case, dict) or "output" not in case:
            raise ValueError(f"prompt {prompt.prompt_id}: metadata['tests'][{i}] must be a mapping with "
                             f"'input' and 'output', got {case!r:.80}")
    passed = run_tests(extract_program(completion_text), tests,
                       time_limit_s=float(meta.get("time_limit_s", DEFAULT_TIME_LIMIT_S)),
                       memory_limit_mb=int(meta.get("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB)))
    return sum(passed) / len(passed)
