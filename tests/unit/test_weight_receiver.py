"""Receiver failures: any exception of one receiver aborts the push for every member at once (not at the
group's timeout). (An engine that refuses fleet.max_refused_syncs pushes in a row: tests/unit/test_fleet.py.)"""

from __future__ import annotations

import threading

import torch

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


def test_tied_checkpoint_whose_index_lists_lm_head_accepts_a_push_without_it():
    """Review W3: the learner never streams lm_head with tied embeddings; some tied checkpoints list it."""
    from megatron_oapl.rollout.vllm_extension import check_stream

    index = {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)}
    stream = [("model.embed_tokens.weight", torch.zeros(8, 4))]
    assert check_stream(stream, index, tied_embeddings=True) is None
    assert "lm_head.weight" in check_stream(stream, index, tied_embeddings=False)  # untied: still required
