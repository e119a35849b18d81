"""What a step holds and computes, operation by operation: live tensor bytes and their peak, and FLOPs; on fake
tensors (the plan) and real ones alike.

Memory: every storage an operation creates is counted until it dies (weak references), and storage resizes are
followed (FSDP2 frees and re-allocates gathered parameters by resizing their storage). `torch.distributed._tools`
has a tracker of this kind, but it fails on frozen parameters (a teacher) and on modules called twice in a step
(KoLeo per view), both of which our steps have; this one needs no module hooks at all. On CUDA the caching
allocator rounds each block up to 512 bytes; `granularity` does the same here.

FLOPs: torch's own formulas (`torch.utils.flop_counter`: matmuls, convolutions, attention), counted in the same
pass; its `FlopCounterMode` would be a second mode that also decomposes every other operation, which made a
fake step ~2x slower. CPU flash attention, which a fake CPU step runs where a GPU runs flash or efficient
attention, is counted with the same attention formulas.
"""

from __future__ import annotations

import math
import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from dinotrain.distributed.fsdp import local

CUDA_BLOCK = 512
_aten = torch.ops.aten
FLOP_FORMULAS = {**flop_registry,
                 _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
                 _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop}


class StepMeter(TorchDispatchMode):
    """Live bytes of every storage created while active (plus those `hold` was given), their peak, and FLOPs.

    `phase` names what is running (set by the caller); the phase at the peak is reported with it."""

    def __init__(self, granularity: int = 1):
        super().__init__()
        self.granularity = granularity
        self.live: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        self.peaks: dict[str, int] = {}  # phase -> its peak
        self.flops = 0
        self.phase = self.peak_phase = ""
        self._resize = None

    def _bytes(self, n: int) -> int:
        return int(math.ceil(n / self.granularity) * self.granularity) if n else 0

    def _set(self, key: int, nbytes: int) -> None:
        self.current += nbytes - self.live.get(key, 0)
        self.live[key] = nbytes
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        if self.current > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.current

    def _forget(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def hold(self, *tensors: torch.Tensor) -> None:
        """Count tensors that exist already (parameters, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        t = local(t)  # a DTensor: this rank holds its local shard
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, or no storage
            return
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._forget(key))
        self._set(key, self._bytes(storage.nbytes()))

    def bytes_of(self, tensors) -> int:
        """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
        seen: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t = local(t)
                st = t.untyped_storage()
                seen[id(st)] = self._bytes(st.nbytes())
        return sum(seen.values())

    def __enter__(self):
        original = torch.UntypedStorage.resize_

        def resize_(storage, size):
            out = original(storage, size)
            key = id(storage)
            if key in self.live:
                self._set(key, self._bytes(storage.nbytes()))
            return out

        self._resize = mock.patch.object(torch.UntypedStorage, "resize_", resize_)
        self._resize.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._resize.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
