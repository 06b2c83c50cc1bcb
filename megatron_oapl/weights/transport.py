"""The weight group: a process group *separate from the learners' world* that joins one sending learner
rank per pipeline stage and every engine rank, and the push/receive protocol on it.

Rendezvous goes through a TCPStore hosted by the coordinator (`WeightStoreServer`) at the address in the
config, so learners and engines can be different jobs on different nodes. Each sync epoch and pipeline
stage gets its own group under a fresh store prefix: engines that were restarted simply join the next
group, and a group never outlives a push.

One push (per stage): for each bucket, the sender broadcasts a JSON header (version, tensor table,
checksum) and then the flat bucket; an end marker carries the bucket count. The receiver verifies every
checksum and the count, and only returns the tensors if everything arrived intact: a corrupt or partial
push raises `WeightSyncError` and the engine keeps its previous weights. gloo on CPU, NCCL on GPU: the
same code, two backends.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_oapl.weights.bucket import BucketHeader, checksum, pack_buckets, unpack_bucket


class WeightSyncError(RuntimeError):
    """A push was corrupt, partial or of the wrong version; the receiver applied nothing."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and how one stage's weight group meets. Rank 0 is the sender; engines are 1..world-1."""

    addr: str
    port: int
    epoch: int  # one per sync (and per re-sync of restarted engines)
    stage: int  # pipeline stage whose tensors this group carries
    world_size: int
    backend: str = "gloo"
    timeout_s: float = 300.0

    def to_dict(self) -> dict:
        return asdict(self)


class WeightStoreServer:
    """The TCPStore every weight group rendezvous through (hosted by the coordinator process)."""

    def __init__(self, addr: str = "127.0.0.1", port: int = 0, timeout_s: float = 300.0):
        self.addr = addr
        self.store = dist.TCPStore(
            addr, port, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.port = self.store.port


class WeightGroup:
    def __init__(self, rdv: Rendezvous, rank: int):
        timeout = datetime.timedelta(seconds=rdv.timeout_s)
        store = dist.TCPStore(rdv.addr, rdv.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(f"oapl-weights/{rdv.epoch}/{rdv.stage}", store)
        if rdv.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, rdv.world_size)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(prefixed, rank, rdv.world_size, timeout)
        self.rank, self.rdv = rank, rdv

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def send_json(self, obj: dict) -> None:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device)
        self.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=self.device))
        self.broadcast(payload)

    def recv_json(self) -> dict:
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(length)
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(payload)
        return json.loads(bytes(payload.cpu().tolist()).decode())


@dataclass
class SyncStats:
    """Seconds per phase and bytes moved by one push (sender side) or receive (engine side)."""

    bytes: int = 0
    buckets: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def send_bucket(group: WeightGroup, header: BucketHeader, flat: torch.Tensor) -> None:
    group.send_json(header.to_dict())
    group.broadcast(flat.to(group.device))


def send_end(group: WeightGroup, version: int, buckets: int) -> None:
    group.send_json({"end": True, "version": version, "buckets": buckets})


def send_weights(
    group: WeightGroup, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int,
    stats: SyncStats | None = None,
) -> SyncStats:
    """Sender side of one push. `named_tensors` is consumed lazily (gathering is timed separately by
    the caller's iterator); packing and sending are timed here."""
    stats = stats or SyncStats()
    start = time.perf_counter()
    for header, flat in pack_buckets(named_tensors, bucket_bytes, version):
        packed = time.perf_counter()
        stats.add("gather+pack", packed - start)
        send_bucket(group, header, flat)
        start = time.perf_counter()
        stats.add("send", start - packed)
        stats.bytes += header.nbytes
        stats.buckets += 1
    send_end(group, version, stats.buckets)
    return stats


def receive_weights(
    group: WeightGroup, expected_version: int, stats: SyncStats | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Receiver side of one push: verified tensors, or `WeightSyncError` (nothing to apply)."""
    stats = stats or SyncStats()
    tensors: list[tuple[str, torch.Tensor]] = []
    problems: list[str] = []
    received = 0
    while True:
        start = time.perf_counter()
        message = group.recv_json()
        if message.get("end"):
            break
        header = BucketHeader.from_dict(message)
        flat = torch.empty(header.nbytes, dtype=torch.uint8, device=group.device)
        group.broadcast(flat)
        got = time.perf_counter()
        stats.add("receive", got - start)
        received += 1
        stats.bytes += header.nbytes
        if header.version != expected_version:
            problems.append(f"bucket {header.index} is of version {header.version}, expected {expected_version}")
        elif checksum(flat) != header.checksum:
            names = ", ".join(t.name for t in header.tensors[:3])
            problems.append(f"bucket {header.index} ({names}...) failed its checksum")
        else:
            tensors.extend((name, t.clone()) for name, t in unpack_bucket(header, flat))
        stats.add("verify", time.perf_counter() - got)
    stats.buckets = received
    if message["buckets"] != received:
        problems.append(f"sender announced {message['buckets']} buckets, {received} arrived")
    if problems:
        raise WeightSyncError(
            f"weight push of version {expected_version} (stage {group.rdv.stage}) refused: " + "; ".join(problems)
        )
    return tensors
