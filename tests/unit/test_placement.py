"""Engine placement (rollout/placement.py): every local engine gets GPUs of its own, after the learners'
on its node, from one function the local fleet, fleet nodes and the launcher share. The GPU count is
faked (torch.cuda.is_available / device_count): this machine has none; the spawn environment is checked
in real spawned processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_oapl.config import ConfigError, load_config
from megatron_oapl.rollout import placement

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def gpus(monkeypatch):
    """Fake a node with `n` GPUs (None: no GPU) for this process."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def fake(n: int | None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n is not None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n or 0)

    return fake


def test_engines_get_consecutive_slices_after_the_learners():
    eight = [str(i) for i in range(8)]
    assert placement.engine_gpu_slices(4, 2, eight) == ["0,1", "2,3", "4,5", "6,7"]  # oapl generate: 4 x TP 2
    assert placement.engine_gpu_slices(2, 1, eight, learner_ranks=6) == ["6", "7"]
    assert placement.engine_gpu_slices(2, 2, ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]) == ["GPU-a,GPU-b", "GPU-c,GPU-d"]


def test_too_many_gpus_is_refused_naming_the_fields():
    with pytest.raises(ConfigError) as err:
        placement.engine_gpu_slices(2, 2, [str(i) for i in range(8)], learner_ranks=6)
    message = str(err.value)
    assert "fleet.num_engines=2 x fleet.engine_tensor_parallel_size=2 + 6 learner rank(s) on this node" in message
    assert "need 10 GPUs, but this node has 8" in message


def test_no_gpu_changes_nothing(gpus):
    gpus(None)
    assert placement.visible_gpus() is None
    assert placement.engine_gpu_slices(3, 2, None, learner_ranks=4) == [None, None, None]


def test_visible_gpus_follow_cuda_visible_devices(gpus, monkeypatch):
    gpus(8)
    assert placement.visible_gpus() == [str(i) for i in range(8)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # e.g. a SLURM step's share of the node
    assert placement.visible_gpus() == ["4", "5", "6", "7"]


def test_learner_ranks_on_the_node():
    assert placement.learner_ranks_on_node({"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "LOCAL_RANK": "0"}) == 8
    assert placement.learner_ranks_on_node({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) == 2  # one-machine launcher
    assert placement.learner_ranks_on_node({}) == 0  # oapl generate, fleet node


def test_fleet_node_with_too_few_gpus_is_refused(gpus, tmp_path):
    from megatron_oapl.rollout.fleet_node import node_engine_environments

    cfg = load_config(TINY, [f"run_dir={tmp_path}", "fleet.engine_tensor_parallel_size=2"], check_hardware=False)
    gpus(4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in node_engine_environments(cfg, 2)] == ["0,1", "2,3"]
    with pytest.raises(ConfigError, match=r"--engines=3 x fleet.engine_tensor_parallel_size=2 need 6 GPUs"):
        node_engine_environments(cfg, 3)


def report_environment(engine_id, generation, cfg_dict, model_dir, rollout_addr, control_addr):
    """Stands in for engine_main in the spawned engine process: records what the engine would see."""
    Path(model_dir, f"engine-{engine_id}.json").write_text(json.dumps(
        {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "VLLM_CACHE_ROOT")}))


@pytest.mark.parametrize("node_gpus", [8, None])
def test_local_fleet_spawns_each_engine_on_its_own_gpus(gpus, monkeypatch, tmp_path, node_gpus):
    """Learner rank 0 of 2 on an 8-GPU node starts 3 engines of TP 2: GPUs 2-3, 4-5, 6-7, and the run's
    compile cache; without a GPU the engines inherit the coordinator's environment unchanged."""
    from megatron_oapl.config import to_dict
    from megatron_oapl.rollout import fleet as fleet_mod
    from megatron_oapl.rollout import supervisor

    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "fleet.num_engines=3",
                             "fleet.engine_tensor_parallel_size=2"], check_hardware=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(supervisor, "engine_main", report_environment)
    gpus(node_gpus)
    fleet = fleet_mod.Fleet(cfg, to_dict(cfg), str(tmp_path))
    try:
        for process in fleet.supervisor.procs.values():
            process.join(timeout=120)
    finally:
        fleet.close()
    seen = [json.loads((tmp_path / f"engine-{i}.json").read_text()) for i in range(3)]
    want_gpus = ["2,3", "4,5", "6,7"] if node_gpus else [None, None, None]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == want_gpus
    assert {s["VLLM_CACHE_ROOT"] for s in seen} == {str((tmp_path / "run" / "vllm_cache").resolve())}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the coordinator's own environment is restored


def test_local_fleet_that_does_not_fit_starts_nothing(gpus, monkeypatch, tmp_path):
    from megatron_oapl.config import to_dict
    from megatron_oapl.rollout import fleet as fleet_mod
    from megatron_oapl.rollout import supervisor

    cfg = load_config(TINY, [f"run_dir={tmp_path}", "fleet.num_engines=2"], check_hardware=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # every GPU of the node holds a learner rank
    started = []
    monkeypatch.setattr(supervisor, "spawn_engine", lambda *a, **k: started.append(a))
    gpus(8)
    with pytest.raises(ConfigError, match=r"fleet.num_engines=2 x fleet.engine_tensor_parallel_size=1 \+ 8 learner"):
        fleet_mod.Fleet(cfg, to_dict(cfg), str(tmp_path))
    assert started == []


def test_compile_cache_dir_is_configurable(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path}", f"fleet.compile_cache_dir={tmp_path / 'shared-cache'}"],
                      check_hardware=False)
    assert placement.compile_cache_dir(cfg) == str(tmp_path / "shared-cache")
