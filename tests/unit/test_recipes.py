"""Every shipped config loads, and `oapl launch slurm CONFIG --dry-run` renders a SLURM script for it that
bash parses and whose job config loads again (what the compute side does first). No cluster needed
(--no-cluster-check). Also the launcher's defaults for recipes: engines on the fleet nodes when there are
fleet nodes, no fleet for offline rounds, input paths made absolute and checked before submission."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from launch import slurm
from megatron_oapl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_NODES = ["--learner-nodes", "2", "--learner-gpus-per-node", "8", "--fleet-gpus-per-node", "8"]


def _gpu(path: Path) -> bool:
    return load_config(path, check_hardware=False).parallel.backend == "nccl"


# The GPU recipes (the CPU configs are the tiny family); base_gpu.yaml is their base, not a run.
RECIPES = [c for c in CONFIGS if _gpu(c) and c.name != "base_gpu.yaml"]


def _argv(path: Path, *extra: str) -> list[str]:
    nodes = GPU_NODES if _gpu(path) else ["--learner-nodes", "1"]
    # --allow-local-paths: the repository (and so the recipes' relative data paths) may live under /tmp here
    return [str(path), "run_dir=/shared/runs/recipe", *nodes, "--dry-run", "--no-cluster-check",
            "--allow-local-paths", *extra]


def test_configs_are_shipped():
    assert {c.name for c in CONFIGS} >= {"tiny.yaml", "base_gpu.yaml", "qwen3_4b_math.yaml",
                                         "r1_distill_qwen14b_code.yaml"}
    assert {c.name for c in RECIPES} >= {"qwen3_4b_math.yaml", "r1_distill_qwen14b_code.yaml",
                                         "qwen3_30b_a3b_math.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_renders_a_slurm_job(path, tmp_path, capsys):
    cfg = load_config(path, check_hardware=False)
    argv = _argv(path, "--requeue", "--save-by", "230")
    assert slurm.main(argv) == 0, capsys.readouterr().err
    script = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the rendered script parses
    assert "export OAPL_SAVE_BY_EPOCH=$(( $(date +%s) + 13800 ))" in script
    if cfg.lag.mode == "offline":  # replays a dataset: no fleet component, no engines
        assert "hetjob" not in script and " FLEET STEP " not in script
    else:  # fleet nodes run the engines by default
        assert "#SBATCH hetjob" in script and "-m megatron_oapl.rollout.fleet_node" in script

    plan = slurm.make_plan(slurm.build_parser().parse_args(argv), None)
    (tmp_path / "job.yaml").write_text(plan.config_yaml)
    job = load_config(tmp_path / "job.yaml", check_hardware=False)  # what the job parses on the compute side
    assert job.run_dir == "/shared/runs/recipe"
    # The job runs in --workdir: the eval sets' files travel as absolute paths.
    assert all(Path(spec["path"]).is_absolute() for spec in job.eval.sets.values() if spec["source"] == "file")
    assert job.fleet.external == (cfg.lag.mode == "online")
    if cfg.data.path:
        assert job.data.path == str(Path.cwd() / cfg.data.path)
    if cfg.lag.offline_dataset:
        assert Path(job.lag.offline_dataset).is_absolute()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_derive_from_the_gpu_base_and_hold_out_eval(path):
    assert yaml.safe_load(path.read_text())["inherit"] == "base_gpu.yaml"  # not the CPU toy
    cfg = load_config(path, check_hardware=False)
    assert cfg.precision.params_dtype == "bf16" and cfg.fleet.engine == "vllm"
    # A file source without {split} would evaluate on the first training prompts.
    assert cfg.data.source in ("jsonl", "parquet") and "{split}" in cfg.data.path
    assert cfg.model.hf_path and cfg.algo.loss == "oapl" and cfg.algo.beta2 == pytest.approx(1e-3)


def test_code_recipe_has_the_papers_offline_settings():
    cfg = load_config(ROOT / "configs" / "r1_distill_qwen14b_code.yaml", check_hardware=False)
    assert cfg.model.preset == "qwen2" and cfg.lag.mode == "offline" and cfg.rewards.name == "code"
    assert cfg.optim.lr == pytest.approx(1e-6) and cfg.optim.lr_decay_style == "cosine"
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (0.9, 0.95)
    assert (cfg.fleet.temperature, cfg.fleet.top_p) == (0.6, 0.95) and cfg.model.max_seq_length == 32768
    # top_p < 1: logp_lag from the learner's frozen copy (the generator offline), not the engine (review W1)
    assert cfg.algo.logp_lag_source == "recompute"
    per_round = cfg.optim.train_steps * cfg.fleet.prompts_per_step * cfg.fleet.group_size
    assert 2 * per_round == pytest.approx(200_000, rel=0.05)  # ~200K generations over two rounds


def test_offline_runs_refuse_fleet_nodes(capsys):
    argv = _argv(ROOT / "configs" / "r1_distill_qwen14b_code.yaml", "--fleet-nodes", "1")
    assert slurm.main(argv) == 2
    assert "--fleet-nodes=1: lag.mode='offline' runs no fleet (allowed: 0" in capsys.readouterr().err


def test_local_fleet_mode_on_gpu_learner_nodes_is_refused_naming_the_fields(capsys):
    """Every GPU of a learner node holds a learner rank: local engines would have none of their own
    (rollout/placement.py, the function the coordinator uses at its start)."""
    argv = _argv(ROOT / "configs" / "qwen3_4b_math.yaml", "--fleet-mode", "local")
    assert slurm.main(argv) == 2
    err = capsys.readouterr().err
    assert ("--fleet-mode=local with --learner-gpus-per-node=8: fleet.num_engines=4 x "
            "fleet.engine_tensor_parallel_size=1 + 8 learner rank(s) on this node need 12 GPUs, but this node "
            "has 8") in err


def test_local_fleet_mode_is_still_available_on_cpu_nodes(capsys):
    argv = _argv(ROOT / "configs" / "tiny.yaml", "--fleet-mode", "local", "--fleet-nodes", "1")
    assert slurm.main(argv) == 0
    out = capsys.readouterr()
    assert "-m megatron_oapl.rollout.fleet_node" not in out.out and "#SBATCH hetjob" in out.out


def test_gpu_learner_step_is_cpu_bound_and_alone_gets_cuda_device_max_connections(capsys):
    """Review P9: the learner step binds each rank's cores (not --gpu-bind=closest, which would hide
    GPUs from LOCAL_RANK), and CUDA_DEVICE_MAX_CONNECTIONS=1 reaches the learners only, not the engines."""
    assert slurm.main(_argv(ROOT / "configs" / "qwen3_4b_math.yaml")) == 0
    script = capsys.readouterr().out
    fleet_step = script.split(" FLEET STEP ")[1].split(" END FLEET STEP ")[0]
    learner_srun = script.split('srun "${LEARNER_SRUN[@]}" --nodes=')[1].split("&\n")[0]
    assert "--cpu-bind=cores --distribution=block:block" in learner_srun
    assert "--export=ALL,CUDA_DEVICE_MAX_CONNECTIONS=1 " in learner_srun
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in fleet_step and "--cpu-bind" not in fleet_step
    assert "export CUDA_DEVICE_MAX_CONNECTIONS" not in script and "--gpu-bind" not in script
    assert slurm.main(_argv(ROOT / "configs" / "qwen3_4b_math.yaml", "--no-default-env")) == 0
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in capsys.readouterr().out


def test_cpu_learner_step_is_not_bound(capsys):
    assert slurm.main(_argv(ROOT / "configs" / "tiny.yaml")) == 0
    assert "--cpu-bind" not in capsys.readouterr().out


def test_missing_data_is_an_error_before_submission(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative data paths resolve where the command runs, not in the repository
    argv = [a for a in _argv(ROOT / "configs" / "qwen3_4b_math.yaml") if a != "--dry-run"]
    assert slurm.main(argv) == 2
    err = capsys.readouterr().err
    # num_eval_prompts 0: no held-out split to check; the benchmarks are eval sets, each file checked.
    assert (f"error: data.path=data/math/{{split}}.parquet: {tmp_path}/data/math/train.parquet does not exist "
            "here (make the train/eval files with `oapl data prepare`)") in err
    for bench in ("aime25", "hmmt25_feb", "hmmt25_nov", "brumo25"):
        assert (f"error: eval.sets.{bench}.path=data/math/{bench}.parquet: {tmp_path}/data/math/{bench}.parquet "
                "does not exist here (make it with `oapl data prepare ... --bench`)") in err
    assert "nothing was submitted" in err
