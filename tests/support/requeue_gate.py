"""A reward for the requeue test that holds the first attempt of a SLURM job after its first checkpoint.

`scontrol requeue` must land while the run is still going, whatever the machine's speed: a run of the
tiny model can finish its 12 steps in under two seconds. From the moment `RUN_DIR/checkpoints/latest`
exists (OAPL_GATE_RUN_DIR), every reward call of the job's first attempt (SLURM_RESTART_COUNT unset or
0) blocks until the process dies, so the run cannot pass the lag round after that checkpoint; the requeued
attempt scores normally and finishes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_oapl.rewards.registry import get_reward


def gated_reasoning_gym(text, prompt) -> float:
    run_dir = Path(os.environ["OAPL_GATE_RUN_DIR"])
    first_attempt = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
    while first_attempt and (run_dir / "checkpoints" / "latest").exists():
        time.sleep(1.0)  # held until the requeue's SIGTERM ends this engine
    return get_reward("reasoning_gym")(text, prompt)
