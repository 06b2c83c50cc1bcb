"""`oapl launch slurm` against a real two-node SLURM cluster on this machine (tests/support/slurm_cluster.py):
checks that fail before submission, the rendered scripts, and real tiny CPU runs as a heterogeneous job
(learners on node1, fleet component on node2), as the homogeneous fallback, through `scontrol requeue`
and through the time-limit warning signal. Skipped where slurm-wlm / munge are not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import SlurmCluster, missing_requirements

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
TINY = ["optim.train_steps=6", "lag.sync_every=2", "data.num_eval_prompts=16", "eval.num_samples=4",
        "fleet.prompts_per_step=4", "data.num_train_prompts=500", "parallel.tensor_model_parallel_size=1"]
HET = ["--learner-partition", "learners", "--fleet-partition", "fleet"]

pytestmark = pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:  # stops every daemon, also on failure
        yield c


@pytest.fixture
def in_cluster(cluster, monkeypatch):
    """Run `launch.slurm.main` in this process against the test cluster."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


def launch_main(*argv: str) -> int:
    from launch.slurm import main

    return main(list(argv))


def launch(cluster: SlurmCluster, *argv: str, env: dict[str, str] | None = None) -> str:
    """`python -m launch.slurm ...` as a user runs it (the job inherits `env`); returns the job id."""
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", *argv], cwd=ROOT, env=env or cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def logs(run_dir: Path) -> str:
    return "\n".join(f"==> {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((run_dir / "logs").glob("*.out")))


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def loss_steps_per_run(run_dir: Path) -> list[list[int]]:
    """Loss steps of each TensorBoard events file (one per run of the job), oldest first."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from megatron_oapl import metrics as M

    runs = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        steps = sorted({ev.step for ev in EventFileLoader(str(path)).Load()
                        for v in ev.summary.value if v.tag == M.LOSS})
        runs.append(steps)
    return runs


def assert_finished_run(cluster: SlurmCluster, job_id: str, run_dir: Path, steps: int, timeout_s: float = 300):
    from megatron_oapl import metrics as M

    info = cluster.wait_job(job_id, timeout_s)
    assert info["components"] and all(c == "COMPLETED" for c in info["components"]), (info, logs(run_dir))
    assert info["ExitCode"] == "0:0", (info, logs(run_dir))
    tb = scalars(run_dir)
    assert sorted(tb[M.LOSS]) == list(range(1, steps + 1)), logs(run_dir)
    assert all(v == v for v in tb[M.LOSS].values())  # finite: NaN != NaN
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (run_dir / "config.yaml").read_text().startswith("# Directory of the run")  # written by the job
    assert (run_dir / "launch" / "config.yaml").is_file() and (run_dir / "launch" / "sbatch.sh").is_file()
    return info


def learner_node(run_dir: Path) -> str:
    text = "".join(p.read_text() for p in (run_dir / "logs").glob("*-learner.out"))
    match = re.search(r"\[rank 0\] srun_env: rank 0/\d+ local_rank 0 on node (\S+)", text)
    assert match, logs(run_dir)
    return match.group(1)


# --------------------------------------------------------------------------------------------------
# Before submission: rendering and actionable errors
# --------------------------------------------------------------------------------------------------


def test_dry_run_renders_het_script_with_requested_options(in_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = launch_main(CONFIG, *TINY, f"run_dir={run_dir}", "model.hf_path=/shared/models/tiny", *HET,
                     "--dry-run", "--allow-local-paths", "--learner-time", "00:10:00", "--fleet-time", "00:09:00",
                     "--env", "NCCL_SOCKET_IFNAME=ib0", "--env", "NCCL_DEBUG=INFO", "--signal", "B:USR1@60",
                     "--requeue", "--save-by", "30", "--setup", "echo setting up", "--job-name", "tinyhet",
                     "optim.lr=2e-4")  # an override after the options is still an override
    out = capsys.readouterr()
    assert rc == 0, out.err
    script = out.out
    assert script.startswith("#!/bin/bash\n")
    header, _, body = script.partition("\nset -o pipefail")
    comp0, sep, comp1 = header.partition("#SBATCH hetjob\n")
    assert sep, header
    for line in ("--partition=learners", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                 "--time=00:10:00", "--job-name=tinyhet", "--signal=B:USR1@60", "--requeue",
                 f"--output={run_dir}/logs/%x-%j.out", "--open-mode=append", f"--chdir={ROOT}"):
        assert f"#SBATCH {line}\n" in comp0, line
    assert "#SBATCH --partition=fleet\n" in comp1 and "#SBATCH --time=00:09:00\n" in comp1
    assert "--gpus-per-node" not in script  # CPU nodes: no GPU options at all
    assert "srun \"${LEARNER_SRUN[@]}\"" in body and "LEARNER_SRUN=(--het-group=0)" in body
    assert "FLEET_SRUN=(--het-group=1)" in body and " FLEET STEP " in body and " END FLEET STEP " in body
    assert '--output="$LOG_STEM-learner.out"' in body and '--output="$LOG_STEM-fleet.out"' in body
    assert "export NCCL_SOCKET_IFNAME=ib0\n" in body and "export NCCL_DEBUG=INFO\n" in body
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1\n" in body  # a default kept
    assert "OAPL_SAVE_BY_EPOCH=$(( $(date +%s) + 1800 ))" in body
    # Learners that exit cleanly after the --save-by deadline stopped for it: the job queues itself again.
    assert '[ "$LEARNER_RC" = 0 ] && [ "$(date +%s)" -ge "$OAPL_SAVE_BY_EPOCH" ]' in body
    assert '-m megatron_oapl.rollout.fleet_node "$JOB_CONFIG"' in body  # fleet nodes run the engines by default
    assert "trap 'forward USR1' USR1" in body and 'scontrol requeue "$SLURM_JOB_ID"' in body
    assert "echo setting up\n" in body
    assert "-m launch.srun_env -- " in body and "megatron_oapl.cli train \"$JOB_CONFIG\"" in body
    assert not run_dir.exists()  # a dry run writes nothing
    assert in_cluster.queue() == []


def test_dry_run_gpu_and_container_options_without_cluster(tmp_path, capsys):
    rc = launch_main(CONFIG, "run_dir=/shared/runs/big", "model.hf_path=/shared/models/tiny",
                     "parallel.tensor_model_parallel_size=2",
                     "fleet.engine_tensor_parallel_size=2", "--dry-run", "--no-cluster-check", "--allow-local-paths",
                     "--learner-nodes", "2", "--learner-gpus-per-node", "4", "--fleet-nodes", "1",
                     "--fleet-gpus-per-node", "8", "--learner-partition", "train", "--fleet-partition", "infer",
                     "--account", "proj", "--container-image", "/shared/img.sqsh", "--container-mounts",
                     "/data:/data", "--exclusive", "--no-default-env")
    out = capsys.readouterr()
    assert rc == 0, out.err
    script = out.out
    comp0, _, comp1 = script.partition("#SBATCH hetjob\n")
    assert "#SBATCH --gpus-per-node=4\n" in comp0 and "#SBATCH --ntasks-per-node=4\n" in comp0
    assert "#SBATCH --nodes=2\n" in comp0 and "#SBATCH --account=proj\n" in comp0
    assert "#SBATCH --exclusive\n" in comp0
    assert "#SBATCH --gpus-per-node=8\n" in comp1.split("set -o pipefail")[0]
    assert "--ntasks=8 --ntasks-per-node=4" in script
    assert ("--container-image=/shared/img.sqsh --container-mounts="
            f"{ROOT}:{ROOT},/shared/runs/big:/shared/runs/big,/data:/data --container-workdir={ROOT}") in script
    assert "PYTHON=python\n" in script and "export NCCL_DEBUG" not in script
    # With fleet nodes the engines run there (external), not beside the learners on their GPUs.
    assert "-m megatron_oapl.rollout.fleet_node" in script and "warning: --fleet-mode" not in out.err


def test_homogeneous_dry_run_splits_nodes(in_cluster, tmp_path, capsys):
    rc = launch_main(CONFIG, *TINY, f"run_dir={tmp_path / 'run'}", "--homogeneous", "--dry-run",
                     "--allow-local-paths")
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "hetjob" not in out.out and "#SBATCH --nodes=2\n" in out.out
    assert 'LEARNER_NODELIST=$(IFS=,; echo "${ALL_NODES[*]:0:1}")' in out.out
    assert 'FLEET_NODELIST=$(IFS=,; echo "${ALL_NODES[*]:1:1}")' in out.out


def test_external_fleet_block_calls_fleet_node(in_cluster, tmp_path):
    """The marked fleet block switches to the fleet_node entry point (the contract in docs/cluster.md)."""
    from launch import slurm

    args = slurm.build_parser().parse_args([CONFIG, *TINY, f"run_dir={tmp_path / 'run'}", *HET,
                                            "--allow-local-paths"])
    plan = dataclasses.replace(slurm.make_plan(args, slurm.query_cluster()), fleet_mode="external")
    script = slurm.render(plan)
    fleet_step = script[script.index(" FLEET STEP "):script.index(" END FLEET STEP ")]
    assert "--het-group=1" in script and "--ntasks-per-node=1" in fleet_step  # one fleet_node per fleet node
    assert '-m megatron_oapl.rollout.fleet_node "$JOB_CONFIG" --engines 1' in fleet_step
    assert '--coordinator-file "$RUN_DIR/coordinator.json"' in fleet_step
    assert '"fleet.weight_sync.master_addr=$MASTER_ADDR"' in script and "FLEET_MUST_LIVE=1" in script


@pytest.mark.parametrize("argv, expect", [
    (["--learner-partition", "nope"],
     ["--learner-partition=nope: no such partition (existing: debug, fleet, learners)"]),
    (["--fleet-partition", "gpu-h100"], ["--fleet-partition=gpu-h100: no such partition"]),
    (["--learner-cpus-per-task", "4"], ["--learner-cpus-per-task=4 x 1 rank(s) per node = 4 CPUs per node",
                                        "at most 1 CPUs"]),
    (["--fleet-cpus-per-node", "3"], ["--fleet-cpus-per-node=3: the nodes of partition fleet have at most 1 CPUs"]),
    (["--learner-gpus-per-node", "8"],
     ["--learner-gpus-per-node=8: the nodes of partition learners have at most 0 GPUs"]),
    (["--fleet-gpus-per-node", "4", "fleet.engine_tensor_parallel_size=3"],
     ["fleet.engine_tensor_parallel_size=3 must divide --fleet-gpus-per-node=4", "--fleet-gpus-per-node=4: "]),
    (["--learner-tasks-per-node", "1", "parallel.tensor_model_parallel_size=2"],
     ["parallel.tensor_model_parallel_size=2 x parallel.pipeline_model_parallel_size=1 = 2 must divide the "
      "learner ranks: --learner-nodes=1 x --learner-tasks-per-node=1 = 1"]),
    (["--learner-nodes", "2"], ["--learner-nodes=2: partition learners has 1 node(s)"]),
    (["--homogeneous", "--learner-nodes", "2", "--fleet-partition", "debug", "--learner-partition", "debug",
      "--learner-tasks-per-node", "1"], ["--learner-nodes=2 + --fleet-nodes=1: partition debug has 2 node(s)"]),
    (["--container-image", "nvcr.io#nvidia/pytorch:25.01-py3"], ["--container-image=nvcr.io#nvidia/pytorch:25.01-py3: "
                                                                  "srun has no --container-image option"]),
    (["--env", "NO_EQUALS"], ["--env='NO_EQUALS' must look like KEY=VALUE"]),
    (["optim.lr=-1"], ["config: optim.lr=-1.0 must be > 0"]),
])
def test_errors_name_the_option_and_nothing_is_submitted(in_cluster, tmp_path, capsys, argv, expect):
    run_dir = tmp_path / "run"
    rc = launch_main(CONFIG, *TINY, f"run_dir={run_dir}", *HET, "--allow-local-paths", *argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expect:
        assert text in err, err
    assert "nothing was submitted" in err
    assert not run_dir.exists() and in_cluster.queue() == []


def test_node_local_paths_are_refused_unless_allowed(in_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"  # pytest's tmp_path lives under /tmp: node-local on a real cluster
    rc = launch_main(CONFIG, *TINY, f"run_dir={run_dir}", *HET, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2
    assert f"run_dir={run_dir} is under /tmp, which compute nodes do not share" in err
    assert "--allow-local-paths" in err


def test_external_fleet_mode_needs_fleet_node(in_cluster, tmp_path, capsys):
    rc = launch_main(CONFIG, *TINY, f"run_dir={tmp_path / 'run'}", *HET, "--allow-local-paths", "--dry-run",
                     "--fleet-mode", "external")
    err = capsys.readouterr().err
    if importlib.util.find_spec("megatron_oapl.rollout.fleet_node") is None:
        assert rc == 2 and "--fleet-mode=external needs megatron_oapl.rollout.fleet_node" in err
    else:  # the entry point exists: the dry run renders it
        assert rc == 0, err


def test_srun_env_maps_slurm_task_variables_and_gres():
    from launch.slurm import gpus_of
    from launch.srun_env import torchrun_env

    env = {"SLURM_PROCID": "11", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "17", "SLURM_LOCALID": "3",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "12",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    assert torchrun_env(env) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                 "OMP_NUM_THREADS": "12"}  # the batch script's MASTER_* are kept
    assert [gpus_of(g) for g in ("gpu:8(S:0-1)", "gpu:h100:4,nic:2", "(null)", "nic:1,gpu:a100:2(S:0)")] == [8, 4, 0, 2]


# --------------------------------------------------------------------------------------------------
# Real jobs
# --------------------------------------------------------------------------------------------------


def test_heterogeneous_job_runs_learners_and_fleet_on_separate_nodes(cluster, tiny_model, tmp_path):
    run_dir = tmp_path / "het"
    job = launch(cluster, CONFIG, *TINY, f"model.hf_path={tiny_model}", f"run_dir={run_dir}", *HET,
                 "--allow-local-paths", "--learner-time", "00:10:00", "--fleet-mode", "local")
    assert (run_dir / "launch" / "job_id").read_text().strip() == job
    info = assert_finished_run(cluster, job, run_dir, steps=6)
    assert info["HetJobIdSet"], info  # really a heterogeneous job
    assert learner_node(run_dir) == "node1"
    assert (run_dir / "launch" / "fleet-node-0.txt").read_text().strip() == "node2"
    assert "[fleet] node node2" in (run_dir / "logs" / f"oapl-het-{job}-fleet.out").read_text()


def test_external_fleet_runs_the_engines_on_the_fleet_node(cluster, tiny_model, tmp_path):
    """--fleet-mode external: component 1 runs megatron_oapl.rollout.fleet_node, whose engines serve the
    coordinator on the learner node through the addresses it published in RUN_DIR/coordinator.json."""
    run_dir = tmp_path / "external"
    job = launch(cluster, CONFIG, *TINY, f"model.hf_path={tiny_model}", f"run_dir={run_dir}", *HET,
                 "--allow-local-paths", "--fleet-mode", "external", "--learner-time", "00:10:00")
    info = assert_finished_run(cluster, job, run_dir, steps=6)
    assert info["HetJobIdSet"], info
    assert learner_node(run_dir) == "node1"
    fleet_log = (run_dir / "logs" / f"oapl-external-{job}-fleet.out").read_text()
    assert "node node2 (index 0): engines [0]" in fleet_log, fleet_log
    assert "engine 0 generation 0 started" in fleet_log
    assert not (run_dir / "coordinator.json").exists()


def test_homogeneous_fallback_runs(cluster, tiny_model, tmp_path):
    run_dir = tmp_path / "homog"
    job = launch(cluster, CONFIG, *TINY, f"model.hf_path={tiny_model}", f"run_dir={run_dir}", "--homogeneous",
                 "--partition", "debug", "--allow-local-paths", "--fleet-mode", "local")
    info = assert_finished_run(cluster, job, run_dir, steps=6)
    assert info["NodeList"] == "node[1-2]" and not info.get("HetJobIdSet")
    fleet = (run_dir / "launch" / "fleet-node-0.txt").read_text().strip()
    assert {learner_node(run_dir), fleet} == {"node1", "node2"}


def held_after_first_checkpoint(run_dir: Path, cluster: SlurmCluster, steps: int) -> tuple[list[str], dict]:
    """Overrides and job environment that hold the job's first attempt once it has checkpointed step 2
    (tests/support/gated_rewards.py), so a requeue or signal always lands mid-run, however fast the
    machine trains."""
    overrides = [o for o in TINY if not o.startswith("optim.train_steps")] + [
        f"optim.train_steps={steps}", "checkpoint.save_every=2",
        "rewards.name=tests.support.gated_rewards:gated_reasoning_gym", "rewards.timeout_s=3600"]
    return overrides, {**cluster.env, "OAPL_GATE_RUN_DIR": str(run_dir)}


def _wait_for_file(path: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear\n{logs(path.parents[1])}")
        time.sleep(0.3)


def test_requeued_job_runs_to_completion(cluster, tiny_model, tmp_path):
    run_dir = tmp_path / "requeue"
    steps = 12
    overrides, env = held_after_first_checkpoint(run_dir, cluster, steps)
    job = launch(cluster, CONFIG, *overrides, f"model.hf_path={tiny_model}", f"run_dir={run_dir}", *HET,
                 "--allow-local-paths", "--requeue", env=env)
    _wait_for_file(run_dir / "checkpoints" / "latest")
    subprocess.run(["scontrol", "requeue", job], env=cluster.env, check=True, timeout=30)
    info = assert_finished_run(cluster, job, run_dir, steps=steps)
    assert info["Restarts"] == "1", info
    batch_log = (run_dir / "logs" / f"oapl-requeue-{job}.out").read_text()
    assert "restart 0" in batch_log and "restart 1" in batch_log and "DUE TO JOB REQUEUE" in batch_log
    runs = loss_steps_per_run(run_dir)
    assert len(runs) == 2, runs  # the learners ran twice, each with its own TensorBoard file
    assert runs[0][-1] < steps, f"the first attempt was not held: {runs}"
    assert runs[-1][-1] == steps
    # The second run resumed from the first's checkpoint (step 2 or later), not from step 1.
    assert runs[-1][0] > 2, f"the requeued run started from step {runs[-1][0]}: no resume; {runs}"


def test_time_limit_warning_is_forwarded_and_job_requeues_itself(cluster, tiny_model, tmp_path):
    """`--signal B:USR1@...` + `--requeue`: the batch script forwards USR1 to the learners (which checkpoint
    and stop), then queues the job again. The warning is sent by hand (`scancel --batch --signal`), as
    SLURM does at the time limit minus the lead time."""
    run_dir = tmp_path / "signal"
    steps = 12
    overrides, env = held_after_first_checkpoint(run_dir, cluster, steps)
    job = launch(cluster, CONFIG, *overrides, f"model.hf_path={tiny_model}", f"run_dir={run_dir}", "--homogeneous",
                 "--allow-local-paths", "--requeue", "--signal", "B:USR1@60", "--max-requeues", "1", env=env)
    _wait_for_file(run_dir / "checkpoints" / "latest")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True, timeout=30)
    info = assert_finished_run(cluster, job, run_dir, steps=steps)
    assert info["Restarts"] == "1", info
    batch_log = (run_dir / "logs" / f"oapl-signal-{job}.out").read_text()
    assert "batch script got SIGUSR1" in batch_log and "requeueing job" in batch_log
