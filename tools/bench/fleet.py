"""Benchmark: generation tokens/s of the real fleet path against vLLM's own batched call, in one run.

Fleet path: the coordinator's `Fleet` + `OrderBook` (work orders in, scored groups out through the
rollout channel) with one vLLM engine process, `fleet.reproducible=false` (the default) and then `true`.
Reference: `vllm.LLM.generate` of exactly the same requests (the orders' prompt ids, n = G, the orders'
seeds) in one call, in this process. Both sides run on a random-weight tiny Llama (it rarely samples its
stop token, so completions run to max_new_tokens), alternately, best of `--repeats`; engine start-up is
not counted. Also reported: the time from a round's start until its first step's P groups are all in.

    python tools/bench/fleet.py                     # 32 prompts x 8 samples x 48 tokens, 3 steps per round

Last line: `fleet/vLLM generation tokens/s (reproducible=false): <x>` (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def max_seq_length(args) -> int:
    return args.tokens + 64  # the tiny task's prompts are ~30 tokens


def run_config(args, model_dir: str, run_dir: str, reproducible: bool):
    from megatron_oapl.config import load_config

    return load_config(str(ROOT / "configs" / "tiny.yaml"), (
        f"model.hf_path={model_dir}", f"run_dir={run_dir}", "fleet.engine=vllm", "fleet.num_engines=1",
        f"fleet.group_size={args.group_size}", f"fleet.prompts_per_step={args.prompts}",
        f"fleet.max_new_tokens={args.tokens}", f"model.max_seq_length={max_seq_length(args)}",
        f"fleet.max_in_flight={args.max_in_flight}", f"fleet.reproducible={str(reproducible).lower()}",
        f"lag.sync_every={args.steps}", "eval.every=0", f"data.num_train_prompts={args.prompts * args.steps * 4}",
        "rewards.num_workers=2"))


class FleetSide:
    """One engine process behind the coordinator's handle; each `round` deals a new round of orders."""

    def __init__(self, cfg):
        from megatron_oapl.config import to_dict
        from megatron_oapl.rollout.fleet import Fleet
        from megatron_oapl.rollout.orders import OrderBook, PromptSampler

        self.cfg = cfg
        self.fleet = Fleet(cfg, to_dict(cfg), cfg.model.hf_path)
        self.fleet.wait_ready(list(self.fleet.engines), timeout_s=600)
        sampler = PromptSampler(cfg.data.num_train_prompts, cfg.data.seed)
        self.book = OrderBook(sampler, cfg.seed, cfg.fleet.prompts_per_step, cfg.lag.sync_every)
        self.next_step = 1

    def round(self) -> tuple[list, float, float]:
        """Sample one lag round (all orders at version 0); returns (groups, seconds, first step seconds)."""
        first, last = self.next_step, self.next_step + self.cfg.lag.sync_every - 1
        self.next_step = last + 1
        first_orders = set(self.book.indices(first))
        wanted = set(range(self.book.indices(first).start, self.book.indices(last).stop))
        start = time.perf_counter()
        self.book.plan_round(first, version=0)
        groups, first_step_s = [], None
        while len(groups) < len(wanted):
            _, arrived = self.fleet.serve(self.book, version=0, timeout_ms=20)
            for g in arrived:
                if g.order_index in wanted and self.book.delivered(("train", g.order_index)):
                    groups.append(g)
            if first_step_s is None and first_orders <= {g.order_index for g in groups}:
                first_step_s = time.perf_counter() - start
        return groups, time.perf_counter() - start, first_step_s

    def close(self) -> None:
        self.fleet.close()


def reference(llm, groups, cfg) -> tuple[int, float]:
    """vLLM's own `LLM.generate` of the same requests, one call; returns (tokens, seconds)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from megatron_oapl.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_oapl.rollout.orders import order_seed

    stops = stop_token_ids(load_tokenizer(cfg.model.hf_path))
    requests = [TokensPrompt(prompt_token_ids=g.prompt.token_ids) for g in groups]
    params = [SamplingParams(n=cfg.fleet.group_size, temperature=cfg.fleet.temperature, top_p=cfg.fleet.top_p,
                             max_tokens=cfg.fleet.max_new_tokens, stop_token_ids=list(stops), logprobs=0,
                             seed=order_seed(cfg.seed, g.order_index), ignore_eos=True, detokenize=True,
                             output_kind=RequestOutputKind.FINAL_ONLY)  # its fastest: no per-step outputs
              for g in groups]
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outputs for c in o.outputs), seconds


def tokens_of(groups) -> int:
    return sum(len(s.token_ids) for g in groups for s in g.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step (P)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="max_new_tokens")
    parser.add_argument("--steps", type=int, default=3, help="steps per round (lag.sync_every)")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="an HF model dir with a tokenizer (default: a random-weight tiny one)")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    model = args.model or str(work / "model")
    if not args.model:  # the tiny tokenizer and a random-weight model (no supervised steps: few early stops)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"), "--out", model, "--sft-steps", "0",
                        f"model.max_seq_length={max_seq_length(args)}"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

    import torch

    from megatron_oapl.rollout.vllm_engine import VLLMEngine

    # The engine processes' setting (engine_main): on CPU, vLLM's OpenMP threads spin at barriers, and two
    # of them on two shared cores made the same call 5-10x slower here.
    torch.set_num_threads(1)
    cfg = run_config(args, model, str(work / "off"), reproducible=False)
    llm = VLLMEngine(model, cfg, seed=0).llm  # the reference, in this process

    results: dict[str, list[float]] = {"fleet": [], "vllm": [], "first": []}
    side = FleetSide(cfg)
    side.round()  # warm-up (first-call costs on both sides)
    reference(llm, side.round()[0], cfg)
    for _ in range(args.repeats):
        groups, seconds, first_s = side.round()
        tokens, ref_seconds = reference(llm, groups, cfg)
        assert tokens_of(groups) > 0
        results["fleet"].append(tokens_of(groups) / seconds)
        results["vllm"].append(tokens / ref_seconds)
        results["first"].append(first_s)
        print(f"round: fleet {tokens_of(groups) / seconds:,.0f} tok/s, vLLM one call {tokens / ref_seconds:,.0f} tok/s, "
              f"first step's groups after {first_s:.2f} s of {seconds:.2f} s", flush=True)
    side.close()

    on = FleetSide(run_config(args, model, str(work / "on"), reproducible=True))
    on.round()
    on_groups, on_seconds, on_first = on.round()
    on.close()
    on_rate = tokens_of(on_groups) / on_seconds

    best_fleet, best_vllm = max(results["fleet"]), max(results["vllm"])
    print(f"requests: {args.prompts * args.steps} groups x {args.group_size} samples x {args.tokens} tokens per round")
    print(f"vLLM LLM.generate, one call:       {best_vllm:,.0f} tok/s")
    print(f"fleet, reproducible=false:         {best_fleet:,.0f} tok/s (first step's groups after "
          f"{min(results['first']):.2f} s)")
    print(f"fleet, reproducible=true:          {on_rate:,.0f} tok/s ({on_rate / best_vllm:.2f}x vLLM; first step's "
          f"groups after {on_first:.2f} s)")
    print(f"fleet/vLLM generation tokens/s (reproducible=false): {best_fleet / best_vllm:.2f}")


if __name__ == "__main__":
    main()
