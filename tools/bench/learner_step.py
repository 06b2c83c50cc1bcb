"""Benchmark: tokens/s of the OAPL learner step vs a plain Megatron next-token cross-entropy step.

Same model, same batch, same Megatron schedule and optimizer, measured interleaved in one run (this
machine is noisy; the ratio is what means something). Goal: ratio >= 0.95.

    python tools/bench/learner_step.py                 # 1 rank, tiny model
    python tools/bench/learner_step.py --tp 2          # 2 gloo ranks, TP=2
    python tools/bench/learner_step.py --hidden 256 --layers 4 --rounds 20
    python tools/bench/learner_step.py --dtype bf16 --hidden 2048 --layers 20 --heads 16 --ffn 5504 \
        --vocab 32000 --seq 512 --prompts 4      # on a GPU (tools/gpu_check.py turns it into MFU)

Last line: `oapl/ce tokens-per-second ratio: <x>`.

    python tools/bench/learner_step.py --lengths longtail --threads 1   # padded whole groups vs packed token budget

With `--lengths longtail` the batch has a long-tailed length mix (most completions short, a few up to
--seq tokens; the padded step computes >= 3x its useful tokens). The same OAPL step runs with whole-group
micro-batches padded to the longest row and with packed token-budget micro-batches
(`parallel.micro_batch_tokens` = --budget, default 2 x --seq), interleaved. Last line:
`packed/padded useful tokens/s: <x>` (useful = prompt + completion tokens, padding excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def bench_config(args) -> dict:
    return {
        "model": {"num_layers": args.layers, "hidden_size": args.hidden,
                  "ffn_hidden_size": args.ffn or 2 * args.hidden, "num_attention_heads": args.heads,
                  "vocab_size": args.vocab, "max_seq_length": args.seq},
        "parallel": {"tensor_model_parallel_size": args.tp},
        "precision": {"params_dtype": args.dtype},
        "fleet": {"group_size": args.group_size, "prompts_per_step": args.prompts},
        "optim": {"lr": 1e-5},
    }


def make_batch(args):
    import torch

    from megatron_oapl.learner.batch import build_batch

    gen = torch.Generator().manual_seed(0)
    prompt_len, comp_len = args.seq // 2, args.seq // 2 - 1
    prompts = [torch.randint(1, args.vocab, (prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    completions = [[torch.randint(1, args.vocab, (comp_len,), generator=gen).tolist() for _ in range(args.group_size)]
                   for _ in range(args.prompts)]
    rewards = (torch.rand(args.prompts, args.group_size, generator=gen) > 0.5).float().tolist()
    logp = [[[-2.0] * comp_len for _ in range(args.group_size)] for _ in range(args.prompts)]
    return build_batch(prompts, completions, rewards, logp, seq_length=args.seq)


def make_longtail_batch(args):
    """Prompts of 16 tokens; completion lengths long-tailed (log-normal around 24 tokens, clipped to the
    row), with one sequence per group at most at the full --seq so the padded step is far longer."""
    import torch

    from megatron_oapl.learner.batch import build_batch

    gen = torch.Generator().manual_seed(0)
    prompt_len, longest = 16, args.seq - 16
    draws = torch.exp(torch.randn(args.prompts, args.group_size, generator=gen) * 0.8 + 3.2)
    lengths = draws.clamp(4, longest).long()
    lengths[0, 0] = longest  # the step's longest row sets the padded length
    prompts = [torch.randint(1, args.vocab, (prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    completions = [[torch.randint(1, args.vocab, (int(n),), generator=gen).tolist() for n in row] for row in lengths]
    rewards = (torch.rand(args.prompts, args.group_size, generator=gen) > 0.5).float().tolist()
    logp = [[[-2.0] * int(n) for n in row] for row in lengths]
    return build_batch(prompts, completions, rewards, logp, seq_length=args.seq)


def longtail_main(args, ctx, cfg_dict) -> None:
    """Padded whole-group micro-batches vs packed token-budget ones on the same long-tailed batch."""
    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.learner.step import train_step

    batch = make_longtail_batch(args)
    packed = {**cfg_dict["parallel"], "micro_batch_tokens": args.budget or 2 * args.seq, "pack_sequences": True}
    cfgs = {"padded": from_dict(cfg_dict), "packed": from_dict({**cfg_dict, "parallel": packed})}
    policies = {name: build_policy(cfg, ctx) for name, cfg in cfgs.items()}
    steps = {name: (lambda n=name: train_step(policies[n], batch, cfgs[n], ctx)) for name in cfgs}
    times, layout = _interleaved(steps, args)
    if ctx.rank == 0:
        useful = int(batch.lengths.sum())
        print(f"batch: {batch.num_sequences} sequences, {useful} useful tokens, padded step "
              f"{batch.tokens.numel()} tokens ({batch.tokens.numel() / useful:.2f}x useful)")
        tps = {}
        for name, t in times.items():
            tps[name] = useful / statistics.median(t)
            info = ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in layout[name].items())
            print(f"{name:>7}: median step {statistics.median(t) * 1e3:8.1f} ms, {tps[name]:9.0f} useful tokens/s ({info})")
        print(f"packed/padded useful tokens/s: {tps['packed'] / tps['padded']:.2f}")


def _interleaved(steps: dict, args):
    """Warm up, then time each step function in turn (drift on the machine hits all alike)."""
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times, layout = {name: [] for name in steps}, {}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            layout[name] = getattr(result, "layout", {})
    return times, layout


def _ce_forward_step(data_iterator, model):
    import torch

    mb = next(data_iterator)
    positions = torch.arange(mb.seq_length, device=mb.tokens.device).unsqueeze(0).expand_as(mb.tokens)
    per_token = model(mb.tokens, positions, None, labels=mb.labels)  # Megatron's own CE path

    def loss_func(output):
        loss = (output.float() * mb.loss_mask).sum()
        count = mb.loss_mask.sum().to(torch.int)
        return loss, count, {"loss": loss.detach()}

    return per_token, loss_func


def ce_step(policy, batch, ctx):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in policy.model:
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    local = batch.shard(ctx.dp_rank, ctx.dp_size).to(ctx.device)  # as train_step does (a GPU needs it)
    get_forward_backward_func()(
        forward_step_func=_ce_forward_step, data_iterator=iter([local]), model=policy.model,
        num_microbatches=1, seq_length=local.seq_length, micro_batch_size=local.num_sequences,
        forward_only=False,
    )
    policy.optimizer.step()


def rank_main(args) -> None:
    import torch

    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.learner.step import train_step

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // args.tp))
    cfg = from_dict(bench_config(args))
    ctx = init_distributed(cfg)
    if args.lengths == "longtail":
        longtail_main(args, ctx, bench_config(args))
        destroy_distributed()
        return
    policy = build_policy(cfg, ctx)
    batch = make_batch(args)
    steps = {"oapl": lambda: train_step(policy, batch, cfg, ctx), "ce": lambda: ce_step(policy, batch, ctx)}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():  # interleaved, so drift on the machine hits both alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    if ctx.rank == 0:
        tokens = batch.tokens.numel()
        tps = {name: tokens / statistics.median(t) for name, t in times.items()}
        for name, value in tps.items():
            print(f"{name:>5}: median step {statistics.median(times[name]) * 1e3:7.1f} ms, {value:9.0f} tokens/s")
        print(f"oapl/ce tokens-per-second ratio: {tps['oapl'] / tps['ce']:.3f}")
    destroy_distributed()


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rank_main(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=None, help="MLP hidden size (default 2 x hidden)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                        help="fixed: every row --seq tokens (oapl vs ce); longtail: padded vs packed")
    parser.add_argument("--budget", type=int, default=0, help="longtail: packed micro-batch tokens (0 = 2 x --seq)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per rank (0 = cores / TP; 1 on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.lengths == "longtail" and "--seq" not in sys.argv:
        args.seq, args.prompts = 256, 8  # long rows, few groups: a few minutes at most on 2 cores
        args.hidden = args.hidden if "--hidden" in sys.argv else 256  # compute, not per-op overhead, dominates
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.tp, port, args), nprocs=args.tp, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
