"""Where engines run on a node: each local engine gets its own `CUDA_VISIBLE_DEVICES` slice of
`fleet.engine_tensor_parallel_size` GPUs, after the GPUs the node's learner ranks hold (learner rank with
LOCAL_RANK i works on visible GPU i). One function for the coordinator's local fleet (`rollout/fleet.py`),
the external fleet's nodes (`rollout/fleet_node.py`) and the launcher's check (`launch/slurm.py`); a plan
that needs more GPUs than the node shows is refused before any engine starts.

Also the rest of an engine's environment: `VLLM_CACHE_ROOT` (vLLM's compile and CUDA-graph cache, shared by
every engine and every restart: `fleet.compile_cache_dir`, default RUN_DIR/vllm_cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from megatron_oapl.config import ConfigError


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPU ids this process sees (CUDA_VISIBLE_DEVICES entries, else 0..count-1); None without a GPU."""
    environ = os.environ if environ is None else environ
    import torch

    if not torch.cuda.is_available():
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def learner_ranks_on_node(environ: Mapping[str, str] | None = None) -> int:
    """Learner ranks that hold GPUs on this node: LOCAL_WORLD_SIZE (torchrun, launch.srun_env), else
    WORLD_SIZE for a learner started by the one-machine launcher (LOCAL_RANK set), else 0 (`oapl
    generate`, a fleet node: no learner here)."""
    environ = os.environ if environ is None else environ
    if environ.get("LOCAL_WORLD_SIZE"):
        return int(environ["LOCAL_WORLD_SIZE"])
    if environ.get("LOCAL_RANK") is not None and environ.get("WORLD_SIZE"):
        return int(environ["WORLD_SIZE"])
    return 0


def engine_gpu_slices(num_engines: int, engine_tp: int, gpus: list[str] | None, learner_ranks: int = 0,
                      engines_field: str = "fleet.num_engines") -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of this node's `num_engines` engines: engine i gets the `engine_tp` GPUs
    after the learners' and those of engines 0..i-1. `gpus` None (no GPU): None each, nothing changes.
    ConfigError naming the fields when the node has too few GPUs."""
    if gpus is None:
        return [None] * num_engines
    need = learner_ranks + num_engines * engine_tp
    if need > len(gpus):
        learners = f" + {learner_ranks} learner rank(s) on this node" if learner_ranks else ""
        raise ConfigError(
            f"{engines_field}={num_engines} x fleet.engine_tensor_parallel_size={engine_tp}{learners} need "
            f"{need} GPUs, but this node has {len(gpus)} ({','.join(gpus) or 'none'}): every engine needs GPUs "
            "of its own (fewer engines, a smaller engine TP, or engines on fleet nodes: fleet.external)")
    first = learner_ranks
    return [",".join(gpus[first + i * engine_tp:first + (i + 1) * engine_tp]) for i in range(num_engines)]


def compile_cache_dir(cfg) -> str:
    """vLLM's cache root for every engine of the run (fleet.compile_cache_dir, else RUN_DIR/vllm_cache)."""
    return str(Path(cfg.fleet.compile_cache_dir or Path(cfg.run_dir) / "vllm_cache").expanduser().resolve())


def engine_environments(cfg, num_engines: int, learner_ranks: int = 0, gpus: list[str] | None = None,
                        engines_field: str = "fleet.num_engines") -> list[dict[str, str]]:
    """The environment each of this node's engines starts with (on top of its parent's): its GPUs, if the
    node has any, and the shared compile cache. `gpus` defaults to what this process sees."""
    gpus = visible_gpus() if gpus is None else gpus
    slices = engine_gpu_slices(num_engines, cfg.fleet.engine_tensor_parallel_size, gpus, learner_ranks,
                               engines_field)
    cache = compile_cache_dir(cfg)
    return [{"VLLM_CACHE_ROOT": cache, **({"CUDA_VISIBLE_DEVICES": s} if s is not None else {})} for s in slices]
