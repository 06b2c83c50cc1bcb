"""Distributed initialisation of the learner ranks (gloo on CPU, NCCL on GPU), and the control plane.

This is the one place that activates the platform layer: on a machine without a GPU it installs the
CPU compatibility layer before Megatron-Core touches CUDA.

Two kinds of traffic between learner ranks:
- collectives (the training step, pushes, checkpoints): every rank arrives within seconds of the others;
  they time out after `parallel.collective_timeout_s` (a NCCL watchdog then kills the process);
- the control plane (`ControlChannel`): what rank 0 alone decides after waiting on the fleet for as long
  as it takes (each step's groups, re-sync orders, sync targets, stop). It never runs on a collective:
  rank 0 writes to the TCPStore the ranks rendezvoused on, the other ranks poll it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_oapl import platform
from megatron_oapl.config import ConfigError, check_world_size


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_coordinator(self) -> bool:
        """Global rank 0 receives rollouts, owns the lag schedule, logs and checkpoints."""
        return self.rank == 0


def resolve_backend(requested: str, device_type: str) -> str:
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if requested == "nccl" and device_type != "cuda":
        raise ConfigError("parallel.backend='nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU")
    return requested


def init_distributed(cfg) -> ParallelContext:
    """Join the learner world (torchrun-style env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
    build Megatron's TP/PP/DP groups and RNG streams; every collective of these groups times out after
    parallel.collective_timeout_s."""
    timeout_s = cfg.parallel.collective_timeout_s
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device_type = platform.activate()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=resolve_backend(cfg.parallel.backend, device_type),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world_size = dist.get_world_size()
    dp_size = check_world_size(cfg, world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_s / 60,  # Megatron makes a timedelta of it: fractions are fine
    )
    # Same seed on every rank: Megatron derives the per-TP-rank streams from it.
    model_parallel_cuda_manual_seed(cfg.seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp_size,
        device=platform.device(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class ControlChannel:
    """Rank 0 -> the other learner ranks, in order, over a TCPStore: message n is pickled under the key
    n (in chunks: the store refuses values over 8 MiB), readers poll for it (a short sleep, never a
    pending collective, so rank 0 may take hours to answer) and the last of them deletes it. The other
    way, a rank that received a stop signal raises a counter that rank 0 reads (`stop_requested`)."""

    CHUNK = 4 << 20
    POLL_MAX_S = 0.05  # a waiting reader checks at most this often (backing off from 1 ms)

    def __init__(self, store, readers: int):
        self.store = dist.PrefixStore("oapl/control/", store)
        self.readers = readers  # ranks other than 0
        self.sequence = 0
        self._stop_sent = False

    @classmethod
    def of_world(cls) -> "ControlChannel":
        """On the store of the default process group (hosted by rank 0 or torchrun's agent)."""
        return cls(dist.distributed_c10d._get_default_store(), dist.get_world_size() - 1)

    def publish(self, message) -> None:
        """Rank 0: the next message."""
        self.sequence += 1
        if not self.readers:
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        key = str(self.sequence)
        chunks = range(0, max(len(data), 1), self.CHUNK)
        for i, start in enumerate(chunks):
            self.store.set(f"{key}/{i}", data[start:start + self.CHUNK])
        self.store.set(key, str(len(chunks)))  # last: a reader that sees it finds every chunk

    def receive(self, stop=None):
        """Another rank: the next message, however long rank 0 takes; meanwhile a stop signal this rank
        receives (`stop` turns true) is passed on to rank 0."""
        self.sequence += 1
        key = str(self.sequence)
        pause = 0.001
        while not self.store.check([key]):
            if stop:
                self.request_stop()
            time.sleep(pause)
            pause = min(pause * 2, self.POLL_MAX_S)
        chunks = int(self.store.get(key))
        message = pickle.loads(b"".join(self.store.get(f"{key}/{i}") for i in range(chunks)))
        if self.store.add(f"{key}/read", 1) == self.readers:  # every reader has it: free the store
            for name in (key, f"{key}/read", *(f"{key}/{i}" for i in range(chunks))):
                self.store.delete_key(name)
        return message

    def request_stop(self) -> None:
        """Another rank: ask rank 0 to stop the run at the next step boundary (once)."""
        if not self._stop_sent:
            self.store.add("stop", 1)
            self._stop_sent = True

    def stop_requested(self) -> bool:
        """Rank 0: did another rank ask to stop?"""
        return self.readers > 0 and self.store.add("stop", 0) > 0
