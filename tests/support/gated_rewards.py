"""Rewards that hold the fleet at a chosen point, so that tests of stops and requeues do not race the
machine's speed (a run of the tiny model can finish 12 steps in under two seconds).

- `gated_reasoning_gym`: from the moment `RUN_DIR/checkpoints/latest` exists (OAPL_GATE_RUN_DIR), every call
  of the SLURM job's first attempt (SLURM_RESTART_COUNT unset or 0) blocks, so the run cannot pass the lag
  round after that checkpoint; the requeued attempt scores normally.
- `prompt_gated_reasoning_gym`: calls for prompts outside the ids listed in the JSON file OAPL_GATE_PROMPTS
  block, so exactly the steps made of those prompts can complete.

A blocked call sleeps until its process is killed; run with a large rewards.timeout_s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_oapl.rewards.registry import get_reward


def _block() -> None:
    while True:
        time.sleep(1.0)


def gated_reasoning_gym(text, prompt) -> float:
    run_dir = Path(os.environ["OAPL_GATE_RUN_DIR"])
    if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and (run_dir / "checkpoints" / "latest").exists():
        _block()
    return get_reward("reasoning_gym")(text, prompt)


def prompt_gated_reasoning_gym(text, prompt) -> float:
    if prompt.prompt_id not in set(json.loads(Path(os.environ["OAPL_GATE_PROMPTS"]).read_text())):
        _block()
    return get_reward("reasoning_gym")(text, prompt)
