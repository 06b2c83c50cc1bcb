"""RewardPool: real worker processes scoring the rewards of tests/support/rewards_for_tests.py by dotted path.

Most cases share one pool through `scripted_reward`, which behaves as the function named in the prompt's
metadata; the pids of processes the rewards start are read back from a file and checked with psutil.
"""

import multiprocessing as mp
import os
import signal
import time

import psutil
import pytest

from megatron_oapl.config import ConfigError, RewardsConfig, load_config
from megatron_oapl.rewards import get_reward, validate_score
from megatron_oapl.rewards.pool import RewardPool
from megatron_oapl.rollout.types import Prompt

SUPPORT = "tests.support.rewards_for_tests"
SCRIPTED = f"{SUPPORT}:scripted_reward"


def _pool(name=SCRIPTED, num_workers=2, timeout_s=30.0, binarize=True) -> RewardPool:
    return RewardPool(RewardsConfig(name=name, binarize=binarize, timeout_s=timeout_s), num_workers)


def _prompt(reward: str, pid_file=None, answer="7") -> Prompt:
    meta = {"reward": reward}
    if pid_file is not None:
        meta["pid_file"] = str(pid_file)
    return Prompt(f"p-{reward}", [], text="q", answer=answer, metadata=meta)


def _drain(pool: RewardPool, timeout_s: float = 30.0) -> dict:
    """Every pending result, by key."""
    results = {}
    deadline = time.monotonic() + timeout_s
    while pool.pending() and time.monotonic() < deadline:
        results.update((r.key, r) for r in pool.poll(timeout_s=1.0))
    assert pool.pending() == 0, f"still pending after {timeout_s} s"
    return results


def _pids(prompt: Prompt) -> list[int]:
    with open(prompt.metadata["pid_file"]) as f:
        return [int(line) for line in f]


def _wait_for_pids(prompt: Prompt, n: int) -> list[int]:
    for _ in range(600):
        if os.path.exists(prompt.metadata["pid_file"]) and len(_pids(prompt)) >= n:
            return _pids(prompt)
        time.sleep(0.05)
    raise AssertionError(f"the reward never recorded {n} pids")


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent (init here) to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _worker_pids(root: int | None = None) -> list[int]:
    children = psutil.Process(root).children(recursive=True)
    return [p.pid for p in children if "megatron_oapl.rewards.pool_worker" in " ".join(p.cmdline())]


def _wait_dead(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """The pids still alive after up to timeout_s (killed processes take a moment to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("binarize", [True, False])
def test_scores_like_the_reward_itself(binarize):
    cases = [("exact_reward", "7"), ("exact_reward", "8"), ("half_reward", "7"), ("bool_reward", "7"),
             ("bool_reward", "8"), ("printing_reward", "8")]
    with _pool(binarize=binarize) as pool:
        for i, (reward, text) in enumerate(cases):
            pool.submit(i, text, _prompt(reward))
        assert pool.pending() == len(cases)
        results = _drain(pool)
        assert pool.stats() == {"calls": len(cases), "errors": 0, "timeouts": 0}
    values = [results[i].value for i in range(len(cases))]
    assert values == [validate_score(get_reward(SCRIPTED)(text, _prompt(reward)), binarize) for reward, text in cases]
    assert values == [1.0, 0.0, 0.0 if binarize else 0.5, 1.0, 0.0, 1.0]
    assert all(r.error is None and not r.timed_out for r in results.values())


def test_non_scores_and_exceptions_are_errors():
    rewards = ["string_reward", "none_reward", "nan_reward", "raising_reward"]
    with _pool() as pool:
        for reward in rewards:
            pool.submit(reward, "1.0", _prompt(reward))
        results = _drain(pool)
        assert pool.stats() == {"calls": 4, "errors": 4, "timeouts": 0}
    assert all(r.value == 0.0 and r.error and not r.timed_out for r in results.values())
    assert "'1.0' (str), not a real number" in results["string_reward"].error
    assert "None (NoneType), not a real number" in results["none_reward"].error
    assert "non-finite score nan" in results["nan_reward"].error
    assert results["raising_reward"].error == "RuntimeError: scorer exploded"


def test_a_dying_worker_is_an_error_and_is_replaced():
    with _pool() as pool:
        pool.submit("exit", "7", _prompt("exiting_reward"))
        pool.submit("after", "7", _prompt("exact_reward"))
        pool.submit("after2", "7", _prompt("exact_reward"))
        results = _drain(pool)
        assert results["exit"].value == 0.0 and "exited with code 3" in results["exit"].error
        assert results["after"].value == 1.0 and results["after2"].value == 1.0
        assert pool.stats() == {"calls": 3, "errors": 1, "timeouts": 0}
        for _ in range(200):  # the replacement may still be starting (not yet exec'd: another cmdline)
            if len(_worker_pids()) == 2:
                break
            time.sleep(0.05)
        assert len(_worker_pids()) == 2  # the dead one was replaced, nothing else started


def test_what_a_reward_starts_is_gone_after_the_call(tmp_path):
    prompt = _prompt("forking_reward", tmp_path / "pids")
    with _pool() as pool:
        pool.submit("fork", "7", prompt)
        assert _drain(pool)["fork"].value == 1.0
        child, orphan = _pids(prompt)  # a child, and a double-forked daemon in a session of its own
        # The worker killed and reaped both before answering: they do not even exist as zombies.
        assert not psutil.pid_exists(child) and not psutil.pid_exists(orphan)


def test_a_hanging_call_blocks_neither_the_caller_nor_other_calls():
    pool = _pool()
    pool.submit("hang", "7", _prompt("sleeping_reward"))
    pool.submit("quick", "7", _prompt("exact_reward"))
    results = {}
    while "quick" not in results:
        results.update((r.key, r) for r in pool.poll(timeout_s=30.0))
    assert results["quick"].value == 1.0 and "hang" not in results
    assert pool.pending() == 1 and pool.poll() == []  # still hanging; poll(0) does not wait for it
    workers = _worker_pids()
    pool.close()
    pool.close()  # idempotent
    assert len(workers) == 2 and _wait_dead(workers) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("late", "7", _prompt("exact_reward"))


def test_timeouts_run_in_parallel_and_kill_what_the_call_started(tmp_path):
    timeout_s = 1.5  # serial timeouts would take 4 x 1.5 s; leaves room for worker restarts on a busy machine
    with _pool(num_workers=2, timeout_s=timeout_s) as pool:
        prompts = [_prompt("forking_sleeping_reward", tmp_path / f"call{i}") for i in range(4)]
        start = time.monotonic()
        for i, prompt in enumerate(prompts):
            pool.submit(i, "7", prompt)
        results = _drain(pool)
        elapsed = time.monotonic() - start
        assert all(r.timed_out and r.value == 0.0 and r.error is None for r in results.values())
        assert pool.stats() == {"calls": 4, "errors": 0, "timeouts": 4}
        # Two rounds of two parallel timeouts (plus worker restarts); serial would be 4 timeouts.
        assert elapsed < 4 * timeout_s, elapsed
        children = [pid for prompt in prompts for pid in _pids(prompt)]
        assert len(children) == 4 and _wait_dead(children) == []  # killed with their worker's group
        pool.submit("after", "7", _prompt("exact_reward"))  # fresh workers replaced the killed ones
        pool.submit("after2", "7", _prompt("exact_reward"))
        assert {k: r.value for k, r in _drain(pool).items()} == {"after": 1.0, "after2": 1.0}


def test_close_kills_workers_and_what_their_calls_started(tmp_path):
    pool = _pool(num_workers=2)
    prompts = [_prompt("forking_sleeping_reward", tmp_path / f"call{i}") for i in range(2)]
    for i, prompt in enumerate(prompts):
        pool.submit(i, "7", prompt)
    children = [_wait_for_pids(prompt, 1)[0] for prompt in prompts]
    workers = _worker_pids()
    assert len(workers) == 2 and all(_alive(p) for p in children)
    pool.close()
    assert _wait_dead(workers + children) == []


def _engine(conn) -> None:
    """A daemonic 'engine' process holding a pool with one worker busy in a hanging call and one idle;
    reports the workers' pids and waits to be killed."""
    with _pool() as pool:
        pool.submit(0, "7", _prompt("exact_reward"))
        (result,) = _drain(pool).values()
        pool.submit(1, "7", _prompt("sleeping_reward"))
        conn.send((result.value, _worker_pids(os.getpid())))
        time.sleep(300)


def test_workers_die_with_a_killed_daemonic_engine():
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    engine = ctx.Process(target=_engine, args=(theirs,), daemon=True)  # like the fleet's engines
    engine.start()
    workers = []
    try:
        assert ours.poll(60), "the engine never reported"
        value, workers = ours.recv()
        assert value == 1.0 and len(workers) == 2 and all(_alive(p) for p in workers)
        os.kill(engine.pid, signal.SIGKILL)
        engine.join()
        # The idle worker sees its socket close; the busy one, stuck in the reward, needs PR_SET_PDEATHSIG.
        assert _wait_dead(workers) == []
    finally:
        engine.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_reward_that_cannot_be_loaded_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match=r"rewards\.name='tests\.support\.rewards_for_tests:nope' could not"):
        _pool(f"{SUPPORT}:nope")
    assert _worker_pids() == []


def test_num_workers_is_at_least_one():
    assert load_config(None, ["rewards.num_workers=3"], check_hardware=False).rewards.num_workers == 3
    with pytest.raises(ConfigError, match=r"^rewards\.num_workers=0 must be >= 1$"):
        load_config(None, ["rewards.num_workers=0"], check_hardware=False)


def test_each_eval_set_is_scored_by_its_own_reward():
    """eval.sets.<set>.reward picks the checker of that set's orders; the rest keep rewards.name."""
    from megatron_oapl.rewards.pool import reward_fields, split_reward

    cfg = load_config(None, [f"rewards.name={SUPPORT}:exact_reward",
                             "eval.sets={strict: {source: reasoning_gym}, "
                             f"lenient: {{source: reasoning_gym, reward: '{SUPPORT}:half_reward'}}}}"],
                      check_hardware=False)
    fields = reward_fields(cfg)
    assert fields == {"rewards.name": f"{SUPPORT}:exact_reward", "eval.sets.lenient.reward": f"{SUPPORT}:half_reward"}
    cfg.rewards.binarize = False  # half_reward's 0.5 would binarize to 0 like a wrong exact answer
    splits = ("train", "eval", "eval/strict", "eval/lenient")
    with RewardPool(cfg.rewards, 1, fields) as pool:
        for split in splits:
            pool.submit(split, "wrong", Prompt("p", [], text="q", answer="7"), split_reward(cfg, split))
        scores = {key: r.value for key, r in _drain(pool).items()}
    assert scores == {"train": 0.0, "eval": 0.0, "eval/strict": 0.0, "eval/lenient": 0.5}


def test_an_eval_sets_reward_that_cannot_be_loaded_names_its_field():
    fields = {"rewards.name": f"{SUPPORT}:exact_reward", "eval.sets.aime.reward": f"{SUPPORT}:nope"}
    with pytest.raises(ValueError, match=r"^eval\.sets\.aime\.reward='tests\.support\.rewards_for_tests:nope' could"):
        RewardPool(RewardsConfig(name=fields["rewards.name"]), 1, fields)
    assert _worker_pids() == []
