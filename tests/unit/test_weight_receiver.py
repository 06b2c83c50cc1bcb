"""Receiver failures: any exception of one receiver aborts the push for every member at once (not at the
group's timeout), and an engine that refuses fleet.max_refused_syncs pushes in a row is killed, restarted
within fleet.max_restarts, then the run fails with a clear error."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

from megatron_oapl.config import from_dict
from megatron_oapl.rollout import fleet as F
from megatron_oapl.rollout.messages import Synced
from megatron_oapl.rollout.weight_receiver import receive_all_stages
from megatron_oapl.weights import transport
from megatron_oapl.weights.sync import stage_rendezvous
from megatron_oapl.weights.transport import WeightGroup, WeightStoreServer, send_weights


def test_a_receiver_out_of_memory_aborts_the_push_for_every_member(monkeypatch):
    server = WeightStoreServer()
    # Far above what the test takes: only an abort, not the timeout, can end the others' waits in time.
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=1, num_stages=1, num_receivers=2,
                            backend="gloo", timeout_s=600)
    staged = {"n": 0}
    real_stage = transport.stage_on_host

    def stage_then_fail(flat):  # receiver rank 1 runs out of memory at its third bucket
        if threading.current_thread().name == "rank1":
            staged["n"] += 1
            if staged["n"] == 3:
                raise MemoryError("injected: out of memory while staging a bucket")
        return real_stage(flat)

    monkeypatch.setattr(transport, "stage_on_host", stage_then_fail)
    outcome: dict[str, str] = {}

    def member(rank: int) -> None:
        try:
            if rank == 0:
                send_weights(WeightGroup(rdvs[0], 0), ((f"t{i}", torch.full((1024,), float(i))) for i in range(200)),
                             1, bucket_bytes=16 * 1024)
            else:
                receive_all_stages(rdvs, rank, 1)
            outcome[rank] = "returned"
        except BaseException as err:  # noqa: BLE001 - recorded for the assertions
            outcome[rank] = f"{type(err).__name__}: {err}"

    threads = [threading.Thread(target=member, args=(r,), name=f"rank{r}") for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a member still waits: the push was not aborted"
    assert outcome[1].startswith("MemoryError")  # the failing receiver sees its own error
    for rank in (0, 2):
        assert outcome[rank].startswith("WeightSyncError") and "aborted" in outcome[rank], outcome[rank]
        assert "MemoryError" in outcome[rank]


def _sleeper():
    time.sleep(600)


def _fleet_of_sleepers(max_refused: int, max_restarts: int) -> F.Fleet:
    """A Fleet's engine bookkeeping over real (idle) processes: the refusal cap only kills and restarts."""
    cfg = from_dict({"fleet": {"max_refused_syncs": max_refused, "max_restarts": max_restarts, "num_engines": 1}},
                    check_hardware=False)
    fleet = object.__new__(F.Fleet)
    ctx = mp.get_context("fork")
    fleet.cfg, fleet.external, fleet.restarts_total = cfg, False, 0

    def start(engine_id, generation):
        proc = ctx.Process(target=_sleeper, daemon=True)
        proc.start()
        return F.EngineProcess(engine_id, proc, generation, version=0)

    fleet._start = start
    fleet.engines = {0: start(0, 0)}
    return fleet


def test_an_engine_that_keeps_refusing_is_restarted_then_the_run_stops():
    fleet = _fleet_of_sleepers(max_refused=3, max_restarts=1)
    refused = {0: Synced(0, 1, "MemoryError: out of memory")}
    try:
        assert fleet.count_refusals(refused) == [] and fleet.count_refusals({0: Synced(0, 1, None)}) == []
        assert fleet.count_refusals(refused) == [] and fleet.count_refusals(refused) == []  # 2 in a row
        first = fleet.engines[0].process
        assert fleet.count_refusals(refused) == [0]  # the third in a row: killed
        assert not first.is_alive() and fleet.restart_dead() == [0]
        assert fleet.engines[0].process.is_alive() and fleet.engines[0].refused_syncs == 0
        for _ in range(3):
            fleet.count_refusals(refused)
        with pytest.raises(RuntimeError, match="max_restarts=1 reached.*refused 3 weight pushes in a row"):
            fleet.restart_dead()
    finally:
        for handle in fleet.engines.values():
            handle.process.kill()


def test_tied_checkpoint_whose_index_lists_lm_head_accepts_a_push_without_it():
    """Review W3: the learner never streams lm_head with tied embeddings; some tied checkpoints list it."""
    from megatron_oapl.rollout.vllm_extension import check_stream

    index = {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)}
    stream = [("model.embed_tokens.weight", torch.zeros(8, 4))]
    assert check_stream(stream, index, tied_embeddings=True) is None
    assert "lm_head.weight" in check_stream(stream, index, tied_embeddings=False)  # untied: still required
