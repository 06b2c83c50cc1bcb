"""The weight group: a process group *separate from the learners' world* that joins one sending learner
rank per pipeline stage and every engine rank, and the push/receive protocol on it.

Rendezvous goes through a TCPStore hosted by the coordinator (`WeightStoreServer`) at the address in the
config, so learners and engines can be different jobs on different nodes. Each sync epoch and pipeline
stage gets its own group under a fresh store prefix: engines that were restarted simply join the next
group, and a group never outlives a push.

One push (per stage): for each bucket, the sender broadcasts a JSON header (version, tensor table,
checksum) and then the flat bucket, packed straight into a buffer on the group's device and checksummed
there once; an end marker carries the bucket count. The receiver verifies every checksum and the count
and stages each verified bucket in host memory (pinned; a host bucket is its own staging), so the device
holds one bucket at a time, never a copy of the model; it returns the tensors (views into the staged
buckets) only if everything arrived intact: a corrupt or partial push raises `WeightSyncError` and the
engine keeps its previous weights. Any other exception of a receiver (an out-of-memory error above all)
aborts the push for every member before it propagates (`receive_all_stages`). A member that dies (before
joining or mid-stream) aborts the push on every member at once instead of stalling them until the
timeout (`WeightGroup`). gloo on CPU, NCCL on GPU: the same code, two backends. Which one a group uses is
settled when it forms (`choose_backend`): every member publishes the device it works on, and NCCL is used
only when each member has a GPU of its own (NCCL refuses two ranks on one GPU: a learner and an engine
sharing a device get gloo through host memory instead).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_oapl.config import CHOICES
from megatron_oapl.weights.bucket import BucketHeader, checksum, pack_buckets, unpack_bucket


_ABORT_KEY = "abort"
_ABORT_POLL_S = 0.05
# The process group's own timeout exceeds the graceful abort deadline (`_wait_until`, timeout_s) by this much,
# so the NCCL watchdog (which tears the process down) never fires before every member aborted cleanly.
_PG_TIMEOUT_FACTOR, _PG_TIMEOUT_MARGIN_S = 2.0, 60.0
_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_CPU = "cpu"

log = logging.getLogger("oapl.weights")
_announced: set[tuple[str, str]] = set()  # (backend, why) already logged by this process


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
    backend: str = "gloo"  # requested: gloo | nccl | auto; the group settles it (`choose_backend`)
    timeout_s: float = 300.0

    def to_dict(self) -> dict:
        return asdict(self)


def device_identity(device: torch.device) -> str:
    """The same name for a device in every process that uses it: "cpu", or the GPU's UUID (device
    indices are per process: CUDA_VISIBLE_DEVICES renumbers them)."""
    if device.type != "cuda":
        return _CPU
    props = torch.cuda.get_device_properties(device)
    return f"GPU-{props.uuid}"


def choose_backend(requested: str, member_devices: list[str]) -> tuple[str, str]:
    """(backend, why) of a weight group whose rank i works on `member_devices[i]` (`device_identity`).

    NCCL needs every member on a GPU, and a GPU of its own: it refuses two ranks of one communicator on
    the same device. Otherwise the group falls back to gloo (a requested "nccl" too: it could not form),
    which moves the buckets through host memory. Every member computes this from the same list, so all
    of them agree without another round trip.
    """
    allowed = CHOICES["fleet.weight_sync.backend"]
    if requested not in allowed:
        raise ValueError(f"fleet.weight_sync.backend={requested!r} is not a backend (allowed: {', '.join(allowed)})")
    if requested == "gloo":
        return "gloo", "fleet.weight_sync.backend=gloo"
    without_gpu = [rank for rank, dev in enumerate(member_devices) if dev == _CPU]
    if without_gpu:
        return "gloo", f"rank(s) {without_gpu} of the group have no GPU (NCCL needs one per member)"
    first_on: dict[str, int] = {}
    for rank, dev in enumerate(member_devices):
        if dev in first_on:
            return "gloo", (f"ranks {first_on[dev]} and {rank} of the group share {dev} "
                            "(NCCL refuses two ranks on one GPU)")
        first_on[dev] = rank
    return "nccl", "every member has a GPU of its own"


def default_member_device(requested: str) -> torch.device:
    """Where a member's buckets live unless it says otherwise: its current GPU, unless gloo was asked for
    or it has none."""
    if requested != "gloo" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_timeout(abort_timeout_s: float) -> datetime.timedelta:
    """The weight group's process-group timeout for a graceful abort deadline of `abort_timeout_s`."""
    return datetime.timedelta(seconds=_PG_TIMEOUT_FACTOR * abort_timeout_s + _PG_TIMEOUT_MARGIN_S)


@contextlib.contextmanager
def _nccl_cleanup_only():
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly) while a weight group's NCCL process group is built (it
    reads the variable then): should its watchdog ever fire, it aborts this group's communicator instead of
    tearing the process down, as the launcher's =1 would (learner rank 0, and with it the job)."""
    saved = os.environ.get(_NCCL_ERROR_HANDLING)
    os.environ[_NCCL_ERROR_HANDLING] = "2"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_NCCL_ERROR_HANDLING, None)
        else:
            os.environ[_NCCL_ERROR_HANDLING] = saved


def stage_on_host(flat: torch.Tensor) -> torch.Tensor:
    """A verified bucket in host memory, where the receiver keeps it until the push is complete: a host bucket
    as it is (it is never reused), a GPU bucket copied into pinned memory (fast copies both ways), so the
    device holds one bucket at a time."""
    if flat.device.type == "cpu":
        return flat
    host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(flat)
    return host


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
    """One rank's membership of a stage's weight group, abortable by any member.

    A dead member must not stall the others until the collective timeout: gloo only errors on the peers
    that talked to the dead rank directly, and a member that dies before joining is never noticed at all.
    So every wait here polls: the group's own progress, an `abort` key shared by the whole sync epoch
    (set by the first member that fails), and an optional `check_peers` callback (the coordinator passes
    one that names engines whose process died). Any of them aborts the process group and raises
    `WeightSyncError` on every member within ~`_ABORT_POLL_S`.

    `device`: where this member works (default: its current GPU, if any). Members publish it when they
    join; the backend follows from all of them (`choose_backend`), and `self.backend` / `self.why` say
    which was used and why. Buckets travel on `self.device`: the member's GPU under NCCL, host memory
    under gloo.
    """

    def __init__(self, rdv: Rendezvous, rank: int, check_peers: Callable[[], str | None] | None = None,
                 device: torch.device | str | None = None):
        timeout = datetime.timedelta(seconds=rdv.timeout_s)
        store = dist.TCPStore(rdv.addr, rdv.port, is_master=False, timeout=timeout)
        self.rank, self.rdv, self.pg = rank, rdv, None
        self._epoch_store = dist.PrefixStore(f"oapl-weights/{rdv.epoch}", store)
        self._check_peers = check_peers
        member_device = torch.device(device) if device is not None else default_member_device(rdv.backend)
        # Join barrier before the process group: its constructor would wait the full timeout for a
        # member that never comes. Each member's join key holds its device, so that all of them can
        # settle the backend from the same list.
        joined = [f"joined/{rdv.stage}/{r}" for r in range(rdv.world_size)]
        self._epoch_store.set(joined[rank], device_identity(member_device).encode())
        self._wait_until(lambda: self._epoch_store.check(joined), "joining", poll_s=0.01)
        devices = [self._epoch_store.get(key).decode() for key in joined]
        self.backend, self.why = choose_backend(rdv.backend, devices)
        self._announce()
        prefixed = dist.PrefixStore(str(rdv.stage), self._epoch_store)
        pg_timeout = collective_timeout(rdv.timeout_s)
        if self.backend == "nccl":
            self.device = member_device  # the communicator is built on the device of the first tensor sent
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = pg_timeout
            with _nccl_cleanup_only():
                self.pg = dist.ProcessGroupNCCL(prefixed, rank, rdv.world_size, opts)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(prefixed, rank, rdv.world_size, pg_timeout)

    def _announce(self) -> None:
        """The sender logs the group's transport once per process and decision (every push would repeat it)."""
        if self.rank != 0 or (self.backend, self.why) in _announced:
            return
        _announced.add((self.backend, self.why))
        downgraded = self.rdv.backend == "nccl" and self.backend != "nccl"
        log.log(logging.WARNING if downgraded else logging.INFO, "weight group transport: %s (%s)%s",
                self.backend, self.why, ", although nccl was requested" if downgraded else "")

    def abort(self, reason: str) -> None:
        """Abort the push for every member of this sync epoch (all stages) and raise here."""
        self.signal_abort(reason)
        raise WeightSyncError(f"weight push (epoch {self.rdv.epoch}, stage {self.rdv.stage}) aborted: {reason}")

    def signal_abort(self, reason: str) -> None:
        """Abort the push for every member of this sync epoch (all stages), without raising here (a member
        that fails with its own exception aborts the others, then lets that exception go on)."""
        self._epoch_store.set(_ABORT_KEY, f"rank {self.rank} of stage {self.rdv.stage}: {reason}".encode())
        self._abort_pg()

    def _abort_pg(self) -> None:
        if self.pg is not None:
            self.pg.abort()  # unblocks this rank's pending collective; the group is unusable afterwards
            self.pg = None

    def _raise_if_aborted(self, what: str) -> None:
        if self._epoch_store.check([_ABORT_KEY]):
            reason = self._epoch_store.get(_ABORT_KEY).decode()
            self._abort_pg()
            raise WeightSyncError(f"weight push (epoch {self.rdv.epoch}, stage {self.rdv.stage}) aborted while "
                                  f"{what}: {reason}")
        problem = self._check_peers() if self._check_peers else None
        if problem:
            self.abort(f"{problem} (while {what})")

    def _wait_until(self, done: Callable[[], bool], what: str, poll_s: float = 0.0005) -> None:
        deadline = time.monotonic() + self.rdv.timeout_s
        next_check = 0.0
        while not done():
            now = time.monotonic()
            if now >= next_check:  # store round trips only every _ABORT_POLL_S, the local poll is cheap
                self._raise_if_aborted(what)
                next_check = now + _ABORT_POLL_S
            if now > deadline:
                self.abort(f"no progress for fleet.weight_sync.timeout_s={self.rdv.timeout_s:.0f} s while {what}")
            time.sleep(poll_s)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.pg is None:
            raise WeightSyncError(f"weight group (epoch {self.rdv.epoch}, stage {self.rdv.stage}) was aborted")
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        work = self.pg.broadcast([tensor], opts)
        self._wait_until(work.is_completed, "broadcasting")
        try:
            work.wait()
        except RuntimeError as err:  # e.g. gloo's "connection closed by peer"
            # A member that aborted first (its pg.abort() closed our connection) left its reason: report it.
            self._raise_if_aborted("broadcasting")
            self.abort(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")

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
    if flat.device != group.device:
        raise ValueError(f"bucket {header.index} is on {flat.device}, the weight group sends from {group.device} "
                         "(pack_buckets(..., device=group.device))")
    group.send_json(header.to_dict())
    group.broadcast(flat)


def send_end(group: WeightGroup, version: int, buckets: int) -> None:
    group.send_json({"end": True, "version": version, "buckets": buckets})


def send_weights(
    group: WeightGroup, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int,
    stats: SyncStats | None = None,
) -> SyncStats:
    """Sender side of one push. `named_tensors` is consumed lazily (gathering is timed separately by
    the caller's iterator); packing and sending are timed here. Buckets are packed on the group's device
    (host tensors go to the GPU in that one copy) and checksummed there once."""
    stats = stats or SyncStats()
    start = time.perf_counter()
    for header, flat in pack_buckets(named_tensors, bucket_bytes, version, device=group.device):
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
    """Receiver side of one push: verified tensors, or `WeightSyncError` (nothing to apply). The tensors are
    views into the buckets staged in host memory (`stage_on_host`): the device holds one bucket at a time."""
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
        elif checksum(flat, header.checksum_kind) != header.checksum:
            names = ", ".join(t.name for t in header.tensors[:3])
            problems.append(f"bucket {header.index} ({names}...) failed its checksum")
        else:
            tensors.extend(unpack_bucket(header, stage_on_host(flat)))
        del flat  # a GPU bucket is freed before the next one arrives
        stats.add("verify", time.perf_counter() - got)
    stats.buckets = received
    if message["buckets"] != received:
        problems.append(f"sender announced {message['buckets']} buckets, {received} arrived")
    if problems:
        raise WeightSyncError(
            f"weight push of version {expected_version} (stage {group.rdv.stage}) refused: " + "; ".join(problems)
        )
    return tensors
