"""Benchmark: effective bandwidth of a full weight sync (TP=2 learner -> one engine process) vs a raw
broadcast of one flat buffer of the same bytes on the same kind of group, in one run. Goal >= 0.85.

    python tools/bench/weight_sync.py                       # ~100M parameters, 64 MiB buckets, gloo
    python tools/bench/weight_sync.py --hidden 512 --layers 4 --bucket-mb 16
    python tools/bench/weight_sync.py --tp 1 --dtype bf16 --backend auto --hidden 2048 --layers 14  # one GPU

Phases: gather (TP all-gather per tensor + HF layout), pack (into flat buckets), send (broadcast),
verify (checksums on the engine), load (copy into the engine's parameters).
Last line: `sync/raw bandwidth ratio: <x>`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def learner_config(args) -> dict:
    return {
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": 4 * args.hidden,
                  "num_attention_heads": args.hidden // 64, "vocab_size": args.vocab, "max_seq_length": 64,
                  "tie_word_embeddings": False},
        "parallel": {"tensor_model_parallel_size": args.tp},
        "precision": {"params_dtype": args.dtype},
    }


def learner_rank(rank: int, port: int, store_port: int, args, results) -> None:
    import torch

    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.learner.model import build_model
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.models.presets import get_architecture
    from megatron_oapl.weights.sync import WeightPusher
    from megatron_oapl.weights.transport import Rendezvous, WeightGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.tp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = from_dict(learner_config(args))
    ctx = init_distributed(cfg)
    model, _ = build_model(cfg, ctx)
    mapping = HFMapping.from_model_config(get_architecture("llama"), cfg.model)
    pusher = WeightPusher(mapping, ctx, int(args.bucket_mb * 2**20))  # the path training pushes through
    for round_ in range(args.rounds):
        torch.distributed.barrier()
        rdv = Rendezvous("127.0.0.1", store_port, epoch=2 * round_, stage=0, world_size=2, backend=args.backend)
        start = time.perf_counter()
        stats = pusher.push(model, rdv, version=round_ + 1)
        sync_seconds = time.perf_counter() - start
        if rank != 0:
            continue
        if round_ == 0:
            print(f"weight group transport: {pusher.transport}", flush=True)
        # The same bytes as one flat buffer on a fresh group of the same kind.
        raw_group = WeightGroup(Rendezvous("127.0.0.1", store_port, epoch=2 * round_ + 1, stage=0, world_size=2,
                                           backend=args.backend), 0)
        flat = torch.ones(stats.bytes, dtype=torch.uint8, device=raw_group.device)
        start = time.perf_counter()
        raw_group.broadcast(flat)
        raw_seconds = time.perf_counter() - start
        results.put({"round": round_, "bytes": stats.bytes, "sync": sync_seconds, "raw": raw_seconds,
                     "gather": stats.seconds["gather"], "pack": stats.seconds.get("gather+pack", 0.0),
                     "send": stats.seconds.get("send", 0.0)})
    destroy_distributed()


def engine(store_port: int, args, results) -> None:
    import torch

    from megatron_oapl.rollout.weight_receiver import receive_all_stages
    from megatron_oapl.weights.transport import Rendezvous, SyncStats, WeightGroup

    torch.set_num_threads(1)
    params: dict[str, torch.Tensor] = {}
    for round_ in range(args.rounds):
        stats = SyncStats()
        rdv = Rendezvous("127.0.0.1", store_port, epoch=2 * round_, stage=0, world_size=2, backend=args.backend)
        tensors = receive_all_stages([rdv], engine_rank=1, version=round_ + 1, stats=stats)
        start = time.perf_counter()
        with torch.no_grad():  # "load": copy into the engine's (persistent) parameters
            for name, tensor in tensors:
                params.setdefault(name, torch.empty_like(tensor)).copy_(tensor)
        load = time.perf_counter() - start
        raw_group = WeightGroup(Rendezvous("127.0.0.1", store_port, epoch=2 * round_ + 1, stage=0, world_size=2,
                                           backend=args.backend), 1)
        flat = torch.empty(sum(t.numel() * t.element_size() for _, t in tensors), dtype=torch.uint8,
                           device=raw_group.device)
        raw_group.broadcast(flat)
        results.put({"round": round_, "verify": stats.seconds.get("verify", 0.0), "load": load})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2, help="learner ranks (TP); 1 on a single GPU")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype")
    parser.add_argument("--backend", choices=("gloo", "nccl", "auto"), default="gloo",
                        help="requested weight-group backend (the group settles it from its members' devices)")
    args = parser.parse_args()

    import socket

    from megatron_oapl.weights.transport import WeightStoreServer

    server = WeightStoreServer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    sender_q, engine_q = spawn.Queue(), spawn.Queue()
    procs = [spawn.Process(target=learner_rank, args=(r, port, server.port, args, sender_q)) for r in range(args.tp)]
    procs.append(spawn.Process(target=engine, args=(server.port, args, engine_q)))
    for p in procs:
        p.start()
    sent = [sender_q.get(timeout=1800) for _ in range(args.rounds)]
    received = [engine_q.get(timeout=1800) for _ in range(args.rounds)]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"{p.name} exited with {p.exitcode}")
    rows = [{**s, **r} for s, r in zip(sent, received)][1:] or [{**sent[0], **received[0]}]  # round 0 warms up
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("sync", "raw", "gather", "pack", "send", "verify", "load")}
    nbytes = rows[0]["bytes"]
    # End to end: the sender's wall time (gather, pack, send; per-bucket verification on the engine
    # holds up the next broadcast, so it is inside) plus the engine's final load into its parameters.
    mean["sync"] += mean["load"]
    per_param = 2 if args.dtype == "bf16" else 4
    print(f"payload: {nbytes / 2**20:.1f} MiB ({nbytes / per_param / 1e6:.1f}M {args.dtype} parameters), "
          f"buckets {args.bucket_mb} MiB")
    print(f"full sync: {mean['sync']:.3f} s ({nbytes / mean['sync'] / 2**30:.2f} GiB/s)   "
          f"raw broadcast: {mean['raw']:.3f} s ({nbytes / mean['raw'] / 2**30:.2f} GiB/s)")
    print("phases (s): " + ", ".join(f"{k} {mean[k]:.3f}" for k in ("gather", "pack", "send", "verify", "load")))
    print(f"sync/raw bandwidth ratio: {mean['raw'] / mean['sync']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
