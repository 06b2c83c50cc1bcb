"""A CPU allocation tracker for tests: the bytes of torch storages a thread creates, live and at peak.

Every op dispatched in the tracking thread (factories, copies, arithmetic, collectives' outputs) is seen by a
`TorchDispatchMode`; each new storage is counted once (by address) until the storage itself is freed (a
weakref finalizer on it: views keep it alive); an output that shares an input's storage (a view, an
in-place or `out=` result) is no allocation. Thread-local, like the mode: a peer in another thread (a
sender) is not counted."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, address: int, nbytes: int) -> None:
        if self._sizes.pop(address, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                address, nbytes = storage.data_ptr(), storage.nbytes()
                # A view or an in-place result shares an input's storage: not an allocation.
                if address and address not in self._sizes and address not in inputs:
                    self._sizes[address] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, address, nbytes)
        return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one bucket count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
