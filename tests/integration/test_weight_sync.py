"""Weight sync on real processes over gloo: TP=2 and PP=2 learners push to a separate engine process,
which then samples; the learner's log-probs of those samples equal the engine's (fp32, atol 1e-4 per
sequence). A corrupt bucket is refused and the engine keeps its weights and version. An engine that dies
during a push (mid-stream, or before it joined) aborts the push on every other member, who keep their
weights, instead of leaving them blocked until the group's timeout."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_oapl.weights.bucket import pack_buckets
from megatron_oapl.weights.sync import stage_rendezvous
from megatron_oapl.weights.transport import (
    WeightGroup,
    WeightStoreServer,
    WeightSyncError,
    send_bucket,
    send_end,
    send_weights,
)
from tests.support.distributed import run_ranks
from tests.support.hf_reference import hf_logits
from tests.support.oapl_case import REF, run_config
from tests.support.reference_llama import ReferenceLlama
from tests.support.sync_workers import (
    engine_receive_and_sample,
    learner_export,
    learner_push_then_score,
    learner_push_to_absent_engine,
)


def write_hf_model(path, seed: int) -> dict:
    """A transformers Llama with the reference architecture and its own random weights."""
    config = transformers.LlamaConfig(
        vocab_size=REF.vocab_size, hidden_size=REF.hidden_size, intermediate_size=REF.ffn_hidden_size,
        num_hidden_layers=REF.num_layers, num_attention_heads=REF.num_heads, num_key_value_heads=REF.num_kv_heads,
        max_position_embeddings=64, rms_norm_eps=REF.eps, rope_theta=REF.rope_theta,
        tie_word_embeddings=REF.tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def start_engine(model_dir, rdvs, version, out_path, engine_rank=1, join_delay_s=0.0) -> mp.Process:
    proc = mp.get_context("spawn").Process(
        target=engine_receive_and_sample,
        args=(str(model_dir), [r.to_dict() for r in rdvs], version, str(out_path), engine_rank, join_delay_s),
    )
    proc.start()
    return proc


@pytest.mark.parametrize(
    "layout,bucket_bytes",
    [("tp2", 1 << 20), ("tp2", 4096), ("pp2", 1 << 20), ("pp2", 4096)],
    ids=["tp2-1MiB", "tp2-4KiB", "pp2-1MiB", "pp2-4KiB"],
)
def test_engine_logprobs_match_learner_after_sync(setup, tmp_path, layout, bucket_bytes):
    root, _ = setup
    model_dir = tmp_path / "engine_model"
    write_hf_model(model_dir, seed=123)  # the engine starts from other weights than the learner's
    tp, pp = (2, 1) if layout == "tp2" else (1, 2)
    server = WeightStoreServer()
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=1, num_stages=pp, num_receivers=1,
                            backend="gloo", timeout_s=120)
    samples = tmp_path / "samples.pt"
    engine = start_engine(model_dir, rdvs, 1, samples)
    run_ranks(2, learner_push_then_score, run_config(tp=tp, pp=pp), str(root / "ref.pt"),
              [r.to_dict() for r in rdvs], 1, bucket_bytes, str(samples), str(tmp_path))
    engine.join(60)
    assert engine.exitcode == 0
    engine_out = torch.load(samples)
    assert engine_out["error"] is None and engine_out["version"] == 1
    result = torch.load(tmp_path / "result.pt")
    if bucket_bytes == 4096:
        assert result["buckets"] > 3  # small buckets really split the stream
    torch.testing.assert_close(result["learner"], result["engine"], rtol=0, atol=1e-4)
    # Non-degenerate sampling: many distinct tokens with non-trivial log-probs.
    tokens = {t for group in engine_out["samples"] for ids, _ in group for t in ids}
    assert len(tokens) > 8 and (result["engine"] < -1.0).all()


def test_flipped_byte_is_refused_and_old_weights_stay(tmp_path):
    model_dir = tmp_path / "engine_model"
    old = write_hf_model(model_dir, seed=1)
    new = {k: v + 1.0 for k, v in old.items()}
    server = WeightStoreServer()
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=7, num_stages=1, num_receivers=1,
                            backend="gloo", timeout_s=60)
    out = tmp_path / "engine.pt"
    engine = start_engine(model_dir, rdvs, 5, out)
    group = WeightGroup(rdvs[0], rank=0)
    buckets = list(pack_buckets(sorted(new.items()), 16 * 1024, version=5))
    assert len(buckets) > 2
    for index, (header, flat) in enumerate(buckets):
        if index == 1:
            flat = flat.clone()
            flat[17] ^= 0x10  # one flipped bit in transit, after the checksum was taken
        send_bucket(group, header, flat)
    send_end(group, 5, len(buckets))
    engine.join(60)
    assert engine.exitcode == 0
    result = torch.load(out)
    assert "bucket 1" in result["error"] and "checksum" in result["error"]
    assert result["version"] == 0
    for name, tensor in old.items():
        assert torch.equal(result["state"][name], tensor), name


def test_failed_push_releases_the_other_tp_ranks(setup, tmp_path):
    """TP=2: the stage's sender fails (its engine never joins); TP rank 1, which only takes part in the
    gathers, must finish them and return instead of waiting in an all-gather the sender left."""
    root, _ = setup
    server = WeightStoreServer()
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=1, num_stages=1, num_receivers=1,
                            backend="gloo", timeout_s=3)
    run_ranks(2, learner_push_to_absent_engine, run_config(tp=2, pp=1), str(root / "ref.pt"),
              [r.to_dict() for r in rdvs], str(tmp_path))
    assert torch.load(tmp_path / "rank0.pt").startswith("raised:")
    assert torch.load(tmp_path / "rank1.pt") == "returned"


@pytest.mark.parametrize("when", ["mid-stream", "before-joining"])
def test_engine_death_aborts_the_push_for_every_member(tmp_path, when):
    """Three engines (group ranks 1-3); engine rank 1 is SIGKILLed. gloo alone would only fail the members
    that talk to rank 1 directly and leave the others blocked for the full timeout (measured: rank 1 of 4
    receivers killed -> 3 members stuck until the op timeout), and nobody notices a member that never joins."""
    model_dir = tmp_path / "engine_model"
    old = write_hf_model(model_dir, seed=1)
    server = WeightStoreServer()
    # A timeout far above what the test takes: an abort, not a timeout, must end every member's wait.
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=3, num_stages=1, num_receivers=3,
                            backend="gloo", timeout_s=600)
    engines = [start_engine(model_dir, rdvs, 2, tmp_path / f"engine{rank}.pt", rank,
                            join_delay_s=600 if (rank == 1 and when == "before-joining") else 0.0)
               for rank in (1, 2, 3)]
    victim = engines[0]

    def check_peers():  # what the coordinator passes: names engines whose process died
        return None if victim.is_alive() else "engine rank 1 died"

    def stream():  # endless small tensors; rank 1 is killed after a few buckets went out
        for i in range(10**6):
            if i == 40 and when == "mid-stream":
                os.kill(victim.pid, signal.SIGKILL)
            yield f"t{i}", torch.full((1024,), float(i))

    if when == "before-joining":
        # Kill once the two others have joined, so the sender is waiting for rank 1 only.
        group_store = server.store
        group_store.wait(["oapl-weights/3/joined/0/2", "oapl-weights/3/joined/0/3"])
        os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(WeightSyncError, match="aborted"):
        send_weights(WeightGroup(rdvs[0], rank=0, check_peers=check_peers), stream(), 2, bucket_bytes=16 * 1024)
    for rank, engine in zip((2, 3), engines[1:]):
        engine.join(120)
        assert engine.exitcode == 0
        result = torch.load(tmp_path / f"engine{rank}.pt")
        assert "aborted" in result["error"] and result["version"] == 0
        for name, tensor in old.items():  # nothing half-applied
            assert torch.equal(result["state"][name], tensor), name
    victim.join(10)
    assert victim.exitcode == -signal.SIGKILL


def test_export_streams_each_stage_into_shards_that_transformers_loads(setup, tmp_path):
    """PP=2: each stage's sender writes its own shards (small shards: several per stage), rank 0 merges one
    index; no rank gathers objects (gather_object & co. raise in the ranks). transformers loads the directory
    with exactly the learner's weights and the reference model's logits."""
    root, _ = setup
    side = tmp_path / "side"
    write_hf_model(side, seed=5)  # config.json of the reference architecture; its weights are replaced
    (tmp_path / "hf").mkdir()
    torch.save({"stale": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")  # an earlier export's file
    run_ranks(2, learner_export, run_config(tp=1, pp=2), str(root / "ref.pt"), str(side), str(tmp_path / "hf"),
              16 * 1024)
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert {f.split("-")[1] for f in files} == {"s000", "s001"} and len(files) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(files)  # the stale file is gone
    ref = torch.load(root / "ref.pt")
    exported = {}
    for name in files:
        exported.update(load_file(out / name))
    assert set(exported) == set(index["weight_map"]) and set(exported) <= set(ref)
    for name, tensor in exported.items():
        assert torch.equal(tensor, ref[name]), name
    tokens = [[3, 7, 11, 2, 5], [9, 9, 1, 4, 8]]
    model = ReferenceLlama(REF, seed=0)
    model.load_state_dict(ref)
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).float()
    torch.testing.assert_close(hf_logits(out, tokens), expected, rtol=0, atol=1e-4)
