"""Learner side of a weight sync: each pipeline stage streams its own layers, TP-gathered one tensor at
a time, in HF names, from its (DP rank 0, TP rank 0) rank to every engine."""

from __future__ import annotations

import time

from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.weights.reshard import iter_hf_tensors
from megatron_oapl.weights.transport import Rendezvous, SyncStats, WeightGroup, send_weights


def is_stage_sender(ctx) -> bool:
    return ctx.dp_rank == 0 and ctx.tp_rank == 0


def push_weights(model_chunks: list, mapping: HFMapping, ctx, rdv: Rendezvous, version: int,
                 bucket_bytes: int) -> SyncStats | None:
    """Collective over this stage's TP group (DP rank 0 only); other DP replicas return at once.
    `rdv` must be this rank's stage. Returns the sender's stats (None on non-senders)."""
    if ctx.dp_rank != 0:
        return None
    tensors = iter_hf_tensors(model_chunks, mapping)
    if not is_stage_sender(ctx):
        for _ in tensors:  # take part in the TP gathers; the stage's TP rank 0 sends
            pass
        return None
    try:
        start = time.perf_counter()
        group = WeightGroup(rdv, rank=0)
        stats = SyncStats()
        stats.add("connect", time.perf_counter() - start)
        return send_weights(group, tensors, version, bucket_bytes, stats)
    except BaseException:
        for _ in tensors:  # finish the TP gathers the stage's other ranks are waiting in, then fail
            pass
        raise


def stage_rendezvous(addr: str, port: int, epoch: int, num_stages: int, num_engines: int,
                     backend: str, timeout_s: float) -> list[Rendezvous]:
    """One group per pipeline stage: its sender (rank 0) and every engine (ranks 1..num_engines)."""
    return [Rendezvous(addr, port, epoch, stage, 1 + num_engines, backend, timeout_s) for stage in range(num_stages)]
