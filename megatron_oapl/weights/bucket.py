"""Flat byte buckets of named tensors, with a checksum an engine verifies before it swaps weights.

A bucket is one contiguous uint8 buffer holding several tensors back to back (any dtypes), padded to a
multiple of 8 bytes; its header lists each tensor's name, dtype, shape and byte offset. Few large
broadcasts are much faster than many small ones (ANCHORS.md §4.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import zlib
from typing import Iterable, Iterator

import torch

_ALIGN = 8
_WEIGHT_MOD = 65521  # position weights 1..65521: a swapped or shifted byte pattern changes the sum


@dataclass
class TensorMeta:
    name: str
    dtype: str  # e.g. "float32"
    shape: list[int]
    offset: int
    nbytes: int


@dataclass
class BucketHeader:
    version: int
    index: int
    nbytes: int
    checksum: list[int]
    tensors: list[TensorMeta] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BucketHeader":
        return cls(**{**d, "tensors": [TensorMeta(**t) for t in d["tensors"]]})


def checksum(flat: torch.Tensor) -> list[int]:
    """A checksum of a flat uint8 bucket, computed where the bucket lives.

    CPU (gloo groups): CRC-32 over the bytes (zlib, C speed, no copy). CUDA (NCCL groups): two
    position-weighted int64 sums over the 32-bit words, on the device, so a GPU bucket never goes through
    the host; wrap-around is fine (integer addition mod 2^64 is order-independent). Sender and receiver
    of one group share a device type, so they always compute the same kind.
    """
    if flat.device.type == "cpu":
        return [zlib.crc32(memoryview(flat.contiguous().numpy()))]
    words = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(words.numel(), device=flat.device, dtype=torch.int64) % _WEIGHT_MOD + 1
    return [int(words.sum().item()), int((words * weights).sum().item())]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int
) -> Iterator[tuple[BucketHeader, torch.Tensor]]:
    """Group tensors into buckets of about `bucket_bytes` (a single larger tensor gets its own)."""
    pending: list[tuple[str, torch.Tensor]] = []
    size, index = 0, 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield _pack(pending, version, index)
            pending, size, index = [], 0, index + 1
        pending.append((name, tensor))
        size += -(-nbytes // _ALIGN) * _ALIGN
    if pending:
        yield _pack(pending, version, index)


def _pack(items: list[tuple[str, torch.Tensor]], version: int, index: int) -> tuple[BucketHeader, torch.Tensor]:
    metas, offset = [], 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(TensorMeta(name, _dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    flat = torch.zeros(offset, dtype=torch.uint8, device=items[0][1].device)
    for meta, (_, tensor) in zip(metas, items):
        flat[meta.offset : meta.offset + meta.nbytes] = tensor.detach().contiguous().view(-1).view(torch.uint8)
    return BucketHeader(version, index, offset, checksum(flat), metas), flat


def unpack_bucket(header: BucketHeader, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views into `flat` (clone them if `flat` is reused)."""
    out = []
    for meta in header.tensors:
        dtype = getattr(torch, meta.dtype)
        raw = flat[meta.offset : meta.offset + meta.nbytes]
        out.append((meta.name, raw.view(dtype).view(meta.shape)))
    return out
