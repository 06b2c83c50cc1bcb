"""Megatron-Core compatibility shims for checkpointing: what megatron-core 0.16.1 needs to save and load
correctly here (CPU ranks on torch's Adam, synchronous saves, ranks that may be SIGKILLed).

Each shim says which Megatron behaviour it works around; drop it when the pinned megatron-core fixes that.
"""

from __future__ import annotations

import contextlib
import queue

import torch

from megatron_oapl.learner.model import optimizer_parts
from megatron_oapl.procs import forked_children_die_with_this_process


def torch_adam_distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of `optimizer` that run on torch's Adam (no Apex / Transformer Engine,
    e.g. on CPU): megatron-core 0.16.1's checkpoint code for them needs the fixes below."""
    from megatron.core.optimizer import DistributedOptimizer
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [o for o in optimizer_parts(optimizer) if isinstance(o, DistributedOptimizer)]


@contextlib.contextmanager
def distributed_optimizer_load_fixes(optimizer):
    """Work around three megatron-core 0.16.1 problems of the distributed optimizer on torch's Adam:

    1. `state_dict()` takes the step from the inner optimizer's per-parameter state and asserts there
       is exactly one value, so a fresh optimizer (no state before its first step) cannot build the
       sharded state dict to load into: give it the state torch Adam creates lazily (step 0, zero
       moments); the load overwrites all of it.
    2. `load_parameter_state_from_fully_reshardable` copies every key of the live state, `step`
       included, from the loaded tensors, which carry no `step` (it travels in the param groups):
       hide `step` during that copy.
    3. `load_state_dict` gives every parameter the *same* step tensor, which torch's Adam increments
       in place once per parameter: give each parameter its own copy afterwards.
    """
    fixed = torch_adam_distributed_optimizers(optimizer)
    for opt in fixed:
        if len(opt.optimizer.state) == 0:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    opt.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                              "exp_avg_sq": torch.zeros_like(p)}
        original = type(opt)._set_main_param_and_optimizer_states

        def set_states_without_step(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                _original(_opt, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states_without_step
    try:
        yield
    finally:
        for opt in fixed:
            opt.__dict__.pop("_set_main_param_and_optimizer_states", None)
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def optimizer_metadata() -> dict:
    # The distributed optimizer's format. 'fully_reshardable' maps every state tensor to the model
    # parameter it belongs to (gathered over DP on save), so TP, PP and DP may all change. Megatron's
    # other choices do not work here: 'fully_sharded_model_space' (0.16.1's default) builds
    # ShardedTensors with `flattened_range`, which 0.16.1's ShardedTensor rejects on save, and
    # 'dp_reshardable' allows DP changes only. The gather is an all-gather over the DP group (Megatron's
    # default; `distrib_optim_fully_reshardable_mem_efficient` would gather on DP rank 0 over gloo
    # instead, slower but lighter on GPU memory).
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def writers_die_with_this_rank() -> None:
    """Megatron's filesystem writer forks one writer process per file and collects their results through
    a queue served by a `spawn` Manager process, which it starts on the first save and never stops: a
    rank killed with SIGKILL left that process (and multiprocessing's resource tracker) running forever.
    Saves here are synchronous, so the queue is filled and read in this very process: an in-process
    queue does the same without a process. The forked writers die with this rank (procs.py)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forked_children_die_with_this_process()
    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
