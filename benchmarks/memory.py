"""Peak memory of one call, on CUDA or on the CPU.

Both report the bytes of the model's own parameters and buffers plus the most that the call itself
had allocated at any moment (its inputs, built beforehand, are not included). Other tensors alive on
the device (e.g. a second model being compared) do not count.

CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus what was allocated before
the call; it covers everything the caching allocator handed out (activations, kernel workspaces).

CPU has no allocator statistics and the process's resident size cannot be reset between calls, so
:class:`TensorBytes` watches the dispatcher instead: every tensor storage an op creates is counted
from its creation until it is freed (a weak-reference finalizer fires when the storage dies), views
and in-place results are not counted twice, and the high-water mark of the sum is the call's peak.
It leaves out allocator overhead and scratch memory inside single kernels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorBytes", "model_bytes", "peak_bytes"]


class TensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive: ``live`` now, ``peak`` at most."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _counted(t)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not _counted(t):
                continue
            storage = t.untyped_storage()
            key = id(storage)  # storages keep one Python object while alive, so the id is stable
            if key in inputs or key in self._tracked:
                continue  # a view or an in-place result: no new memory
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def _counted(t: Any) -> bool:
    return isinstance(t, Tensor) and t.device.type != "meta"


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], Any], model: nn.Module, device: torch.device) -> tuple[int, str]:
    """(peak bytes while ``fn()`` runs, how it was measured); the model is assumed on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        during = torch.cuda.max_memory_allocated(device) - before
        return model_bytes(model) + during, "parameters + buffers + peak allocated during the call (CUDA allocator)"
    with TensorBytes() as tracker:
        fn()
    return model_bytes(model) + tracker.peak, "parameters + buffers + peak of tensor storage created by the call"
