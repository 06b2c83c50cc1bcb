"""Bucket checksums and the push receiver's memory, measured with a CPU allocation tracker
(tests/support/alloc_tracker.py: bytes of the torch storages the receiving thread creates).

What the receiver test measures: the receiver's peak of live storage bytes during one push, minus what it
still holds at the end as the staged push (the returned tensors' storages, in host memory). On a GPU engine
that difference is the device-side memory of a push (buckets and checksum temporaries; the staging is in
pinned host memory); here device and host are one memory, so it is measured as the same quantity on CPU."""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_oapl.weights import bucket as B
from megatron_oapl.weights.sync import stage_rendezvous
from megatron_oapl.weights.transport import (
    WeightGroup,
    WeightStoreServer,
    receive_weights,
    send_bucket,
    send_end,
)
from tests.support.alloc_tracker import StorageTracker, storage_bytes

CHUNK_WORDS = 4 * 65521  # 1 MiB of bucket per chunk


def one_shot_sums(flat: torch.Tensor) -> list[int]:
    """The weighted sums as first written: whole-bucket int64 copies plus an int64 arange (~6x the bucket)."""
    words = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(words.numel(), dtype=torch.int64) % 65521 + 1
    return [int(words.sum().item()), int((words * weights).sum().item())]


@pytest.mark.parametrize("nbytes", [8, 4 * 65521, 4 * 65521 + 8, 3 * (4 * CHUNK_WORDS) + 1000])
def test_chunked_sums_equal_the_one_shot_value(nbytes):
    flat = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    flat[:8] = 255  # large words: the int64 sums wrap around the same way
    assert B.weighted_sums(flat, CHUNK_WORDS) == one_shot_sums(flat)
    assert B.weighted_sums(flat, 65521) == one_shot_sums(flat)


def test_chunked_sums_temporaries_stay_within_one_chunk():
    flat = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8)
    with StorageTracker() as tracked:
        B.weighted_sums(flat, CHUNK_WORDS)
    chunk_int64 = 8 * CHUNK_WORDS
    assert tracked.peak <= 3 * chunk_int64  # weights, products, a reduction's scratch
    assert tracked.peak < flat.numel() // 4  # the one-shot form holds ~6x the bucket


def test_a_changed_byte_changes_both_kinds():
    flat = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    other = flat.clone()
    other[1000] ^= 1
    for kind in (B.CRC32, B.SUMS):
        assert B.checksum(flat, kind) != B.checksum(other, kind)


def test_receiver_peak_is_buckets_not_the_model():
    """A 48 MiB push in 8 MiB buckets with the device kind of checksum (weighted sums, as on a GPU): the
    receiver's extra memory beyond the staged push stays within 2x the largest bucket."""
    bucket_bytes = 8 << 20
    tensors = [(f"w{i}", torch.randn(512, 1024 + 64 * i)) for i in range(24)]
    packed = [(header, flat) for header, flat in B.pack_buckets(tensors, bucket_bytes, version=3)]
    for header, flat in packed:  # what a GPU sender sends: the device kind of checksum
        header.checksum, header.checksum_kind = B.checksum(flat, B.SUMS), B.SUMS
    largest = max(header.nbytes for header, _ in packed)
    server = WeightStoreServer()
    rdv = stage_rendezvous("127.0.0.1", server.port, epoch=1, num_stages=1, num_receivers=1,
                           backend="gloo", timeout_s=60)[0]

    def send():
        group = WeightGroup(rdv, 0)
        for header, flat in packed:
            send_bucket(group, header, flat)
        send_end(group, 3, len(packed))

    sender = threading.Thread(target=send)
    sender.start()
    group = WeightGroup(rdv, 1)
    with StorageTracker() as tracked:
        received = receive_weights(group, expected_version=3)
    sender.join(60)
    staged = storage_bytes(t for _, t in received)
    assert staged == sum(header.nbytes for header, _ in packed)  # one host copy of the push, no more
    assert tracked.peak - staged <= 2 * largest
    for (name, sent), (got_name, got) in zip(tensors, received):
        assert name == got_name and torch.equal(sent, got)
