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
# Words per chunk of the weighted sums: a multiple of _WEIGHT_MOD, so every chunk uses the same weights. 1 MiB of
# bucket per chunk; the temporaries are two int64 vectors of one chunk (4 MiB), whatever the bucket size.
CHECKSUM_CHUNK_WORDS = 4 * _WEIGHT_MOD
CRC32 = "crc32"  # host buckets (gloo groups): zlib's CRC-32, C speed, no copy
SUMS = "sums"  # device buckets (NCCL groups): two position-weighted int64 sums, computed where the bucket lives


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
    checksum_kind: str = CRC32  # which `checksum` the receiver recomputes (the sender's choice)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BucketHeader":
        return cls(**{**d, "tensors": [TensorMeta(**t) for t in d["tensors"]]})


def checksum_kind(device: torch.device) -> str:
    """The checksum a bucket on `device` is verified with: CRC-32 in host memory, weighted sums on a GPU (a GPU
    bucket never goes through the host)."""
    return CRC32 if torch.device(device).type == "cpu" else SUMS


def checksum(flat: torch.Tensor, kind: str | None = None) -> list[int]:
    """A checksum of a flat uint8 bucket, of `kind` (default: `checksum_kind` of the bucket's device)."""
    kind = kind or checksum_kind(flat.device)
    if kind == CRC32:
        return [zlib.crc32(memoryview(flat.detach().cpu().contiguous().numpy()))]
    if kind == SUMS:
        return weighted_sums(flat)
    raise ValueError(f"unknown checksum kind {kind!r} (allowed: {CRC32}, {SUMS})")


def weighted_sums(flat: torch.Tensor, chunk_words: int = CHECKSUM_CHUNK_WORDS) -> list[int]:
    """[sum of the 32-bit words, sum of word i * (i % 65521 + 1)], both as wrapped int64, on the bucket's device.

    Chunked, so the temporaries are two int64 vectors of `chunk_words` (the weights and the products), never a
    multiple of the bucket. Integer addition mod 2^64 is order-independent, so the value is the same on any
    device and for any chunk size that is a multiple of 65521 words.
    """
    if chunk_words % _WEIGHT_MOD:
        raise ValueError(f"chunk_words={chunk_words} must be a multiple of {_WEIGHT_MOD}")
    words = flat.view(torch.int32)
    n = min(chunk_words, words.numel())
    weights = torch.arange(n, device=flat.device, dtype=torch.int64) % _WEIGHT_MOD + 1
    products = torch.empty(n, device=flat.device, dtype=torch.int64)
    plain = weighted = torch.zeros((), device=flat.device, dtype=torch.int64)
    for start in range(0, words.numel(), chunk_words):
        chunk = words[start : start + chunk_words]
        size = chunk.numel()
        torch.mul(chunk, weights[:size], out=products[:size])
        plain = plain + chunk.sum(dtype=torch.int64)
        weighted = weighted + products[:size].sum()
    return [int(plain.item()), int(weighted.item())]  # one device sync per bucket, not per chunk


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int,
    device: torch.device | str | None = None,
) -> Iterator[tuple[BucketHeader, torch.Tensor]]:
    """Group tensors into buckets of about `bucket_bytes` (a single larger tensor gets its own), packed straight
    into a buffer on `device` (default: the first tensor's): each byte is copied once and checksummed once,
    there (`checksum_kind`)."""
    pending: list[tuple[str, torch.Tensor]] = []
    size, index = 0, 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield _pack(pending, version, index, device)
            pending, size, index = [], 0, index + 1
        pending.append((name, tensor))
        size += -(-nbytes // _ALIGN) * _ALIGN
    if pending:
        yield _pack(pending, version, index, device)


def _pack(items: list[tuple[str, torch.Tensor]], version: int, index: int,
          device: torch.device | str | None) -> tuple[BucketHeader, torch.Tensor]:
    metas, offset = [], 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(TensorMeta(name, _dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    flat = torch.empty(offset, dtype=torch.uint8, device=device if device is not None else items[0][1].device)
    end = 0
    for meta, (_, tensor) in zip(metas, items):
        flat[end : meta.offset].zero_()  # the alignment padding (the checksum covers it)
        flat[meta.offset : meta.offset + meta.nbytes].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
        end = meta.offset + meta.nbytes
    flat[end:].zero_()
    kind = checksum_kind(flat.device)
    return BucketHeader(version, index, offset, checksum(flat, kind), metas, kind), flat


def unpack_bucket(header: BucketHeader, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views into `flat` (clone them if `flat` is reused; the receiver never reuses it)."""
    out = []
    for meta in header.tensors:
        dtype = getattr(torch, meta.dtype)
        raw = flat[meta.offset : meta.offset + meta.nbytes]
        out.append((meta.name, raw.view(dtype).view(meta.shape)))
    return out
