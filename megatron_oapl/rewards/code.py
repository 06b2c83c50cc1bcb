"""`code` reward: run the completion's Python program on stdin/stdout test cases in a fenced subprocess.

    prompt.metadata["tests"] = [{"input": "1 2\\n", "output": "3\\n"}, ...]
    optional: metadata["time_limit_s"] (CPU seconds per test, default 5),
              metadata["memory_limit_mb"] (address space, default 512)

The program is the last ```python (or ```py / bare ```) fenced block of the completion, else the whole
text. Reward = fraction of test cases whose stdout matches the expected output after normalisation
(surrounding whitespace stripped, trailing whitespace of each line dropped) with exit status 0; 1.0 only
if all pass (`binarize` turns partial credit into 0).

What fences the program: `rewards.code_sandbox` (see `rewards/sandbox.py`). The default, "bwrap",
runs each test case in a fresh bubblewrap sandbox (read-only system, private /tmp and home, no network,
no run files or credentials, its own PID namespace) under CPU, memory, output-size and process limits and
a wall-clock limit of 2 x the CPU limit + 1 s. Where bubblewrap cannot run, the reward refuses to start
unless the config opts into "rlimits-only" (CPU, memory and output limits only: the program runs as
the run's user, with its files and network).

`get_reward("code")` is `code_reward` under the default "bwrap"; `build_code_reward(cfg.rewards)` is the
reward for a config's `rewards.code_sandbox` and refuses at construction, with a one-line error naming the
field, when that sandbox cannot run here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from typing import Any, Callable

from megatron_oapl.rewards.registry import register_reward
from megatron_oapl.rewards.sandbox import MAX_OUTPUT_BYTES, Sandbox
from megatron_oapl.rollout.types import Prompt

__all__ = ["code_reward", "build_code_reward", "extract_program", "run_tests", "normalize_output"]

DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_MEMORY_LIMIT_MB = 512

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", flags=re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The last fenced python block of the completion, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalize_output(text: str) -> str:
    """Stripped, with trailing whitespace removed from every line (line endings unified)."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def run_tests(program: str, tests: list[dict[str, Any]], sandbox: Sandbox,
              time_limit_s: float = DEFAULT_TIME_LIMIT_S,
              memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB) -> list[bool]:
    """Pass/fail of `program` on each {"input", "output"} test case, each run a fresh process in `sandbox`."""
    cpu_s = max(1, int(round(time_limit_s)))
    wall_s = 2 * time_limit_s + 1.0
    mem_bytes = int(memory_limit_mb) << 20
    workdir = tempfile.mkdtemp(prefix="oapl-code-")
    try:
        path = os.path.join(workdir, "solution.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(path, 0o644)  # under bwrap as root the program runs as a uid of its own (whatever the umask)
        results = []
        for case in tests:
            in_path, out_path = os.path.join(workdir, "stdin.txt"), os.path.join(workdir, "stdout.txt")
            with open(in_path, "w", encoding="utf-8") as f:
                f.write(str(case.get("input", "")))
            with open(in_path, "rb") as fin, open(out_path, "wb") as fout:
                status = sandbox.run(path, fin, fout, cpu_s, mem_bytes, wall_s)
            with open(out_path, "rb") as f:
                out = f.read(MAX_OUTPUT_BYTES + 1).decode("utf-8", errors="replace")
            results.append(status == 0 and normalize_output(out) == normalize_output(str(case["output"])))
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_code_reward(cfg_rewards: Any, bwrap: str = "bwrap") -> Callable[[str, Prompt], float]:
    """The `code` reward fenced as `cfg_rewards.code_sandbox` says; ValueError (one line naming the field)
    when that sandbox cannot run here. `bwrap` locates bubblewrap (a name on PATH or a path)."""
    sandbox = Sandbox(cfg_rewards.code_sandbox, bwrap=bwrap)

    def code_reward_in_sandbox(completion_text: str, prompt: Prompt) -> float:
        return _score(completion_text, prompt, sandbox)

    return code_reward_in_sandbox


@functools.lru_cache(maxsize=1)
def _default_sandbox() -> Sandbox:
    return Sandbox("bwrap")


@register_reward("code")
def code_reward(completion_text: str, prompt: Prompt) -> float:
    """Fraction of prompt.metadata["tests"] the completion's program passes (1.0 = all), under bubblewrap."""
    return _score(completion_text, prompt, _default_sandbox())


def _score(completion_text: str, prompt: Prompt, sandbox: Sandbox) -> float:
    meta = prompt.metadata or {}
    tests = meta.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"prompt {prompt.prompt_id} has no metadata['tests'] (a non-empty list of "
                         "{'input': str, 'output': str}); the code reward needs test cases")
    for i, case in enumerate(tests):
        if not isinstance(case, dict) or "output" not in case:
            raise ValueError(f"prompt {prompt.prompt_id}: metadata['tests'][{i}] must be a mapping with "
                             f"'input' and 'output', got {case!r:.80}")
    passed = run_tests(extract_program(completion_text), tests, sandbox,
                       time_limit_s=float(meta.get("time_limit_s", DEFAULT_TIME_LIMIT_S)),
                       memory_limit_mb=int(meta.get("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB)))
    return sum(passed) / len(passed)
