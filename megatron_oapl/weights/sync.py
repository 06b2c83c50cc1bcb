"""Learner side of a weight sync, the one push path (training, the tests and tools/bench/weight_sync.py):
each pipeline stage's layers, TP-gathered one tensor at a time into HF names, go from the stage's (DP rank
0, TP rank 0) rank to every engine in checksummed buckets."""

from __future__ import annotations

import time

from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.weights.reshard import gather_role, iter_hf_tensors
from megatron_oapl.weights.transport import Rendezvous, SyncStats, WeightGroup, send_weights


def is_stage_sender(ctx) -> bool:
    return ctx.dp_rank == 0 and ctx.tp_rank == 0


class WeightPusher:
    """Pushes of one learner rank. `push` is collective over the stage's TP group (DP rank 0 only; other
    data-parallel replicas return at once, but for the expert-parallel peers of DP rank 0, which take part
    in the expert gathers): every TP rank takes part in the gathers, and all of them are
    done before the sender opens the group, so a push that fails (an engine died) never leaves a TP peer
    waiting in a gather. The sender keeps the host copy it sent (memory: one copy of the stage's weights),
    so engines restarted later are brought to the same version by `resend` while the learner moves on.
    Both return the sender's `SyncStats` (None on other ranks) and raise `WeightSyncError` (or the
    transport's error) on the sender when the push fails."""

    def __init__(self, mapping: HFMapping, ctx, bucket_bytes: int):
        self.mapping, self.ctx, self.bucket_bytes = mapping, ctx, int(bucket_bytes)
        self.last: list | None = None  # the sender's last pushed (name, host tensor) pairs
        self.transport = ""  # the sender's last weight group: its backend and why (for logs and benchmarks)

    @property
    def last_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.last or [])

    def push(self, model_chunks: list, rdv: Rendezvous, version: int, check_peers=None) -> SyncStats | None:
        """The current weights as `version`; `rdv` is this rank's stage's group."""
        role = gather_role(self.ctx)
        if role is None:
            return None
        stats, start = SyncStats(), time.perf_counter()
        if not is_stage_sender(self.ctx):  # takes part in the gathers; only the sender keeps a host copy
            for _ in iter_hf_tensors(model_chunks, self.mapping, experts_only=role == "experts"):
                pass
            return None
        self.last = [(name, t.detach().to("cpu", copy=True)) for name, t in iter_hf_tensors(model_chunks, self.mapping)]
        stats.add("gather", time.perf_counter() - start)
        return self._send(rdv, version, check_peers, stats)

    def resend(self, rdv: Rendezvous, version: int, check_peers=None) -> SyncStats | None:
        """The last push again (to engines that missed it); only the stage's sender does anything."""
        if not is_stage_sender(self.ctx):
            return None
        if self.last is None:
            raise RuntimeError("resend before any push: nothing to resend")
        return self._send(rdv, version, check_peers, SyncStats())

    def _send(self, rdv: Rendezvous, version: int, check_peers, stats: SyncStats) -> SyncStats:
        start = time.perf_counter()
        group = WeightGroup(rdv, 0, check_peers)
        stats.add("connect", time.perf_counter() - start)
        self.transport = f"{group.backend} ({group.why})"
        return send_weights(group, self.last, version, self.bucket_bytes, stats)


def stage_rendezvous(addr: str, port: int, epoch: int, num_stages: int, num_receivers: int,
                     backend: str, timeout_s: float) -> list[Rendezvous]:
    """One group per pipeline stage: its sender (rank 0) and every receiving rank (1..num_receivers).

    `num_receivers` counts ranks, not engines: an engine takes `engine.weight_ranks` consecutive ranks (one
    per tensor-parallel worker of a vLLM engine, each receiving the full tensors), so it is the sum of the
    engines' `weight_ranks`."""
    return [Rendezvous(addr, port, epoch, stage, 1 + num_receivers, backend, timeout_s)
            for stage in range(num_stages)]
