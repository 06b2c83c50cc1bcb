"""Process bodies of the weight-sync tests: learner ranks that push, an engine process that receives."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_oapl.rollout.types import SamplingParams
from megatron_oapl.weights.transport import Rendezvous

PROMPTS = [[3, 7, 11], [5, 2], [9, 9, 9, 1]]
SAMPLING = SamplingParams(n=4, temperature=0.7, top_p=1.0, max_new_tokens=6, seed=0)


def engine_receive_and_sample(model_dir: str, rdvs: list[dict], version: int, out_path: str,
                              engine_rank: int = 1, join_delay_s: float = 0.0) -> None:
    """Join the weight groups, load the push (or record the refusal), then sample and save."""
    from megatron_oapl.rollout.torch_engine import TorchEngine
    from megatron_oapl.rollout.weight_receiver import receive_all_stages
    from megatron_oapl.weights.transport import WeightSyncError

    torch.set_num_threads(1)
    engine = TorchEngine(model_dir)
    error = None
    time.sleep(join_delay_s)
    try:
        tensors = receive_all_stages([Rendezvous(**r) for r in rdvs], engine_rank=engine_rank, version=version)
        engine.load_weights(tensors, version)
    except WeightSyncError as err:
        error = str(err)
    samples = engine.generate(PROMPTS, SAMPLING)
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    torch.save({"samples": [[(s.token_ids, s.logprobs) for s in group] for group in samples],
                "error": error, "version": engine.version, "state": state}, out_path)


def learner_push_then_score(cfg_dict: dict, ref_state_path: str, rdvs: list[dict], version: int,
                            bucket_bytes: int, samples_path: str, out_dir: str) -> None:
    """Load the reference weights, push them, then score the engine's samples with the learner."""
    from megatron_oapl.learner.batch import build_batch
    from megatron_oapl.learner.distributed import destroy_distributed
    from megatron_oapl.learner.step import forward_logprobs
    from megatron_oapl.weights.sync import WeightPusher
    from tests.support.learner_workers import reference_policy

    cfg, ctx, policy, mapping = reference_policy(cfg_dict, ref_state_path)
    try:
        stats = WeightPusher(mapping, ctx, bucket_bytes).push(policy.model, Rendezvous(**rdvs[ctx.pp_rank]), version)
        deadline = time.monotonic() + 120
        while not Path(samples_path).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the engine never wrote its samples")
            time.sleep(0.2)
        time.sleep(0.5)  # let the writer finish
        engine_out = torch.load(samples_path)
        groups = engine_out["samples"]
        batch = build_batch(PROMPTS, [[tok for tok, _ in g] for g in groups], [[0.0] * len(g) for g in groups],
                            [[lp for _, lp in g] for g in groups])
        learner_logp = forward_logprobs(policy, batch, cfg, ctx)
        if ctx.rank == 0:
            torch.save({"learner": learner_logp, "engine": batch.logp_lag, "buckets": getattr(stats, "buckets", None)},
                       Path(out_dir) / "result.pt")
    finally:
        destroy_distributed()


def learner_push_to_absent_engine(cfg_dict: dict, ref_state_path: str, rdvs: list[dict], out_dir: str) -> None:
    """Push into a group whose engine never joins: the stage's sender fails, and every rank must still
    return (the other TP ranks are inside the TP gathers of the stream when it does)."""
    from megatron_oapl.learner.distributed import destroy_distributed
    from megatron_oapl.weights.sync import WeightPusher
    from megatron_oapl.weights.transport import WeightSyncError
    from tests.support.learner_workers import reference_policy

    cfg, ctx, policy, mapping = reference_policy(cfg_dict, ref_state_path)
    try:
        try:
            WeightPusher(mapping, ctx, 1 << 20).push(policy.model, Rendezvous(**rdvs[ctx.pp_rank]), 1)
            outcome = "returned"
        except WeightSyncError as err:
            outcome = f"raised: {err}"
        torch.save(outcome, Path(out_dir) / f"rank{ctx.rank}.pt")
    finally:
        destroy_distributed()


def learner_export(cfg_dict: dict, ref_state_path: str, side_dir: str, out_dir: str, shard_bytes: int) -> None:
    """Export the reference weights with `export_hf_model`, every object gather refused in this rank."""
    import torch.distributed as dist

    from megatron_oapl.learner.distributed import destroy_distributed
    from megatron_oapl.weights.export import export_hf_model
    from tests.support.learner_workers import reference_policy

    cfg, ctx, policy, mapping = reference_policy(cfg_dict, ref_state_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the export gathered objects across ranks")

    dist.gather_object = dist.all_gather_object = dist.gather = refuse
    try:
        export_hf_model(policy.model, mapping, ctx, side_dir, out_dir, shard_bytes)
    finally:
        destroy_distributed()
