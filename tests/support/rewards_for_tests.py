"""Reward functions the reward-pool tests name by dotted path (`tests.support.rewards_for_tests:NAME`), so
that worker processes import them exactly as they would a user's reward.

Rewards that start processes write the pids to `prompt.metadata["pid_file"]` (one per line) so the test
can check that those processes are gone.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from megatron_oapl.rollout.types import Prompt

_SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


def exact_reward(completion_text: str, prompt: Prompt) -> float:
    return 1.0 if completion_text.strip() == str(prompt.answer) else 0.0


def length_reward(completion_text: str, prompt: Prompt) -> float:
    """Varies from sample to sample even for a random model that never answers: every group carries a
    ranking signal, so a step moves the weights."""
    return (len(completion_text) % 3) / 2


def half_reward(completion_text: str, prompt: Prompt) -> float:
    return 0.5


def printing_reward(completion_text: str, prompt: Prompt) -> float:
    print("a reward's own output " * 1000)  # must not disturb the pool's channel to the worker
    return 1.0


def sleeping_reward(completion_text: str, prompt: Prompt) -> float:
    time.sleep(300)
    return 1.0


_slept_for: set[str] = set()


def slow_reasoning_gym(completion_text: str, prompt: Prompt) -> float:
    """The task's own reward, except that the first call in each reward worker for a prompt listed in the JSON
    file OAPL_SLOW_PROMPTS sleeps OAPL_SLOW_SECONDS first: the steps made of those prompts wait that long for
    their groups (a slow fleet), the others do not."""
    import json

    from megatron_oapl.rewards.registry import get_reward

    slow = set(json.loads(open(os.environ["OAPL_SLOW_PROMPTS"]).read()))
    if prompt.prompt_id in slow and prompt.prompt_id not in _slept_for:
        _slept_for.add(prompt.prompt_id)
        time.sleep(float(os.environ["OAPL_SLOW_SECONDS"]))
    return get_reward("reasoning_gym")(completion_text, prompt)


def string_reward(completion_text: str, prompt: Prompt) -> str:
    return "1.0"


def none_reward(completion_text: str, prompt: Prompt) -> None:
    return None


def nan_reward(completion_text: str, prompt: Prompt) -> float:
    return math.nan


def bool_reward(completion_text: str, prompt: Prompt) -> bool:
    return completion_text == str(prompt.answer)


def raising_reward(completion_text: str, prompt: Prompt) -> float:
    raise RuntimeError("scorer exploded")


def exiting_reward(completion_text: str, prompt: Prompt) -> float:
    os._exit(3)


def _record(prompt: Prompt, *pids: int) -> None:
    with open(prompt.metadata["pid_file"], "a") as f:
        f.write("".join(f"{pid}\n" for pid in pids))


def forking_reward(completion_text: str, prompt: Prompt) -> float:
    """Leaves behind a child, and a daemon that double-forked into a session of its own (no longer its
    child, not in its process group)."""
    child = subprocess.Popen(_SLEEPER)
    spawn = (f"import subprocess; p = subprocess.Popen({_SLEEPER!r}, start_new_session=True, "
             "stdout=subprocess.DEVNULL); print(p.pid)")
    daemon = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    grandchild = int(daemon.communicate()[0])  # its parent has exited: it is an orphan now
    _record(prompt, child.pid, grandchild)
    return 1.0


def forking_sleeping_reward(completion_text: str, prompt: Prompt) -> float:
    """Starts a child and then hangs: only the pool's kill (timeout or close) can end both."""
    _record(prompt, subprocess.Popen(_SLEEPER).pid)
    time.sleep(300)
    return 1.0


def scripted_reward(completion_text: str, prompt: Prompt) -> float:
    """Behaves as the reward of this module named by `prompt.metadata["reward"]` (one pool, many cases)."""
    return globals()[prompt.metadata["reward"]](completion_text, prompt)


def unreliable_reasoning_gym(completion_text: str, prompt: Prompt) -> float:
    """The task's own reward, except that about 1 call in 8 raises and 1 in 16 hangs (for the end-to-end
    run: errors and timeouts are counted and reach TensorBoard, and sampling goes on meanwhile)."""
    import zlib

    from megatron_oapl.rewards.registry import get_reward

    draw = zlib.crc32(f"{prompt.prompt_id}|{completion_text}".encode()) % 16
    if draw < 2:
        raise RuntimeError("unreliable reward: simulated failure")
    if draw == 2:
        time.sleep(600)
    return get_reward("reasoning_gym")(completion_text, prompt)


def _leave_a_child() -> None:
    """Start a `sleep 300.<OAPL_CHILD_MARKER>` child and return without waiting for it (a reward that
    shells out and forgets its child); its pid goes to OAPL_CHILD_PIDS, so a test knows children were
    started and finds them by the marker in their command line."""
    marker = os.environ.get("OAPL_CHILD_MARKER")
    if marker:
        child = subprocess.Popen(["sleep", f"300.{marker}"])
        with open(os.environ["OAPL_CHILD_PIDS"], "a") as f:
            f.write(f"{child.pid}\n")


def child_leaving_reasoning_gym(completion_text: str, prompt: Prompt) -> float:
    """The task's own reward, after leaving a child process behind (`_leave_a_child`)."""
    from megatron_oapl.rewards.registry import get_reward

    _leave_a_child()
    return get_reward("reasoning_gym")(completion_text, prompt)


def child_leaving_unreliable_reasoning_gym(completion_text: str, prompt: Prompt) -> float:
    """`unreliable_reasoning_gym`, after leaving a child process behind (`_leave_a_child`)."""
    _leave_a_child()
    return unreliable_reasoning_gym(completion_text, prompt)
