"""The control plane on real processes: rank 0 may wait on the fleet far longer than a collective may take,
and `oapl generate` survives a kill -9.

- `oapl train` (TP=2 on gloo) with parallel.collective_timeout_s far below the time each step's rollouts
  take (a reward that sleeps): the other rank waits on the control channel (a TCPStore it polls), not in a
  collective, so the run completes. Before, it sat in `broadcast_object_list` and timed out.
- `oapl generate` appends each group as it arrives: SIGKILL it mid-run, tear its last line, run the same
  command again: it samples only the orders not on disk, and the file ends with every order exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_oapl import metrics as M
from tests.integration.test_train_e2e import COMMON, ROOT, finish, oapl_train, scalars

CONFIG = str(ROOT / "configs" / "tiny.yaml")


def prompt_ids_of_orders(model_dir: Path, orders: range) -> list[str]:
    """The training prompts that work orders `orders` sample (rollout/orders.py)."""
    from megatron_oapl.config import load_config
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.rollout.orders import PromptSampler

    cfg = load_config(CONFIG, (f"model.hf_path={model_dir}", *COMMON))
    prompts = load_prompts(cfg.data, "train")
    sampler = PromptSampler(len(prompts), cfg.data.seed)
    return [prompts[sampler.prompt_index(i)].prompt_id for i in orders]


def slow_reward_env(tmp_path: Path, name: str, prompt_ids: list[str], seconds: float) -> dict:
    """Environment for tests.support.rewards_for_tests:slow_reasoning_gym."""
    listing = tmp_path / f"{name}.json"
    listing.write_text(json.dumps(prompt_ids))
    return {**os.environ, "OAPL_SLOW_PROMPTS": str(listing), "OAPL_SLOW_SECONDS": str(seconds)}


def test_a_fleet_slower_than_the_collective_timeout_does_not_stop_the_run(tiny_model, tmp_path):
    """Steps 1 and 2 each wait 8 s for their groups (the reward of their first prompt sleeps; L = 1, so step
    2's orders are dealt only after the push that follows step 1), the collectives time out after 4 s."""
    run_dir = tmp_path / "run"
    env = slow_reward_env(tmp_path, "slow", prompt_ids_of_orders(tiny_model, range(0, 8, 4)), 8.0)
    proc = oapl_train(tiny_model, run_dir, "optim.train_steps=2", "lag.sync_every=1", "eval.every=0",
                      "parallel.collective_timeout_s=4", "rewards.timeout_s=60",
                      "rewards.name=tests.support.rewards_for_tests:slow_reasoning_gym", env=env)
    finish(proc, 300)
    tb = scalars(run_dir)
    assert sorted(tb[M.LOSS]) == [1, 2] and sorted(tb[M.SYNC_SECONDS]) == [1, 2]
    assert all(tb[M.WAIT_SECONDS][step] > 4 for step in (1, 2)), tb[M.WAIT_SECONDS]  # longer than the timeout
    assert (run_dir / "hf").is_dir()


def oapl_generate(model_dir: Path, tmp_path: Path, out: Path, env: dict) -> subprocess.Popen:
    """3 steps of 4 orders; one group in flight at a time, so groups arrive in order."""
    cmd = [sys.executable, "-m", "megatron_oapl.cli", "generate", CONFIG, f"model.hf_path={model_dir}", *COMMON,
           f"run_dir={tmp_path / 'gen'}", "fleet.max_in_flight=8", "rewards.timeout_s=600",
           "rewards.name=tests.support.rewards_for_tests:slow_reasoning_gym", "--out", str(out), "--steps", "3"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def test_kill_9_of_generate_then_the_same_command_samples_only_the_missing_orders(tiny_model, tmp_path):
    from types import SimpleNamespace

    from megatron_oapl.rollout.dataset import RolloutDataset

    out = tmp_path / "rollouts.jsonl"
    # First run: the reward never returns for orders 8-11, so the run is killed with orders 0-7 on disk.
    proc = oapl_generate(tiny_model, tmp_path, out, slow_reward_env(
        tmp_path, "first", prompt_ids_of_orders(tiny_model, range(8, 12)), 600))
    try:
        deadline = time.monotonic() + 240
        while not (out.is_file() and out.read_text().count("\n") >= 8):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    before = out.read_text()
    assert sorted(json.loads(line)["order_index"] for line in before.splitlines()) == list(range(8))
    with out.open("a") as f:  # a line torn by the kill: dropped by the rerun
        f.write(before.splitlines()[0][:50])

    # The same command again, now with a reward that never returns for orders 0-7: it must not sample them.
    rerun = oapl_generate(tiny_model, tmp_path, out, slow_reward_env(
        tmp_path, "second", prompt_ids_of_orders(tiny_model, range(0, 8)), 600))
    try:
        text, _ = rerun.communicate(timeout=240)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    assert rerun.returncode == 0, text[-3000:]
    assert "already holds 8 of the 12 groups: sampling the other 4" in text, text[-3000:]
    after = out.read_text()
    assert after.startswith(before)  # the groups on disk were kept as they were
    assert sorted(json.loads(line)["order_index"] for line in after.splitlines()) == list(range(12))
    data = RolloutDataset(out, SimpleNamespace(temperature=1.0, top_p=1.0, group_size=8))
    assert [data.group(i).order_index for i in range(12)] == list(range(12))
