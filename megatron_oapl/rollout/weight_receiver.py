"""Engine side of a weight sync: join every pipeline stage's weight group, verify, and hand back the full
set of HF-named tensors only if every stage arrived intact (all-or-nothing). The tensors live in host
memory (`transport.stage_on_host`) until the engine loads them."""

from __future__ import annotations

import time

import torch

from megatron_oapl.weights.transport import (
    Rendezvous,
    SyncStats,
    WeightGroup,
    WeightSyncError,
    receive_weights,
)


def receive_all_stages(
    rendezvous: list[Rendezvous], engine_rank: int, version: int, stats: SyncStats | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Every stage is received even after a refused one (the senders are waiting in the collective);
    the error is raised at the end, so nothing is half-applied.

    Any other exception here (an out-of-memory error, a bug) aborts the push for every member of the
    sync epoch at once, every stage included, before it propagates: the senders and the other engines
    stop waiting now, not at the group's timeout."""
    stats = stats or SyncStats()
    tensors: list[tuple[str, torch.Tensor]] = []
    errors: list[str] = []
    for rdv in rendezvous:
        start = time.perf_counter()
        group = WeightGroup(rdv, engine_rank)
        stats.add("connect", time.perf_counter() - start)
        try:
            tensors.extend(receive_weights(group, version, stats))
        except WeightSyncError as err:
            errors.append(str(err))
        except BaseException as err:
            group.signal_abort(f"receiver failed: {type(err).__name__}: {str(err)[:300]}")
            raise
    if errors:
        raise WeightSyncError("; ".join(errors))
    return tensors
