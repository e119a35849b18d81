"""A world of N ranks inside one process, whose tensors hold no memory: what `dinotrain plan` runs a step in.

PyTorch gives the pieces: fake tensors (shapes, dtypes and devices, no data, no compute), the `fake` process
group backend (collectives that return at once) and FSDP2, which shards over them as over real ranks. What
this module adds is what makes the run's own code run there unchanged:

- one device mesh built before the fake mode (FSDP2 would build one per `fully_shard` call, from a tensor that
  fake mode cannot read);
- weight initialisation without data-dependent loops (`trunc_normal_`'s rejection sampling reads values), and
  settings computed on real CPU tensors where the code asks for `device="cpu"`;
- modules moved between devices by reassigning their tensors (`nn.Module.to` swaps them, which fake tensors
  refuse);
- on `cuda` without a GPU: the few `torch.cuda` calls FSDP2 makes (current device, streams, events) answered
  here. What cannot run there is backward: the autograd engine starts a thread per CUDA device, which needs a
  driver (`plan/step.py` traces the CUDA forward and optimizer step, and measures the whole step on `cpu`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode


class _Stream:
    """A CUDA stream that orders nothing (fake tensors have no work to order)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _Stream)

    def __hash__(self) -> int:
        return 0


class _Event(_Stream):
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


_ONE_STREAM = _Stream()


@contextlib.contextmanager
def _cuda_without_gpu() -> Iterator[None]:
    """The `torch.cuda` calls FSDP2 and our device code make, answered without a driver."""
    with contextlib.ExitStack() as stack:
        for name, value in {
            "current_device": lambda: 0, "set_device": lambda device: None, "device_count": lambda: 1,
            "Stream": _Stream, "Event": _Event, "current_stream": lambda device=None: _ONE_STREAM,
            "default_stream": lambda device=None: _ONE_STREAM, "stream": lambda s: contextlib.nullcontext(),
            "synchronize": lambda device=None: None,
        }.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(torch.Tensor, "record_stream", lambda self, stream: None))
        yield


def _initialise_without_reading(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                                b: float = 2.0, generator=None) -> torch.Tensor:
    """`trunc_normal_` without its rejection loop, which reads values (the values of fake tensors do not exist)."""
    with torch.no_grad():
        return tensor.normal_(mean, std)


def _real_on_cpu(factory):
    """A tensor factory that, asked for `device="cpu"` explicitly, makes a real tensor: the model code computes
    settings that way (stochastic-depth rates: `torch.linspace(..., device="cpu").tolist()`)."""

    def make(*args, **kwargs):
        if str(kwargs.get("device")) == "cpu":
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return factory(*args, **kwargs)
        return factory(*args, **kwargs)

    return make


def move_to(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to(device)` for fake tensors: each parameter and buffer reassigned (`.to()` would swap them)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device != device:
                sub._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)
    return module


def _module_to(original):
    """`nn.Module.to` that moves fake modules between devices by reassignment (dtype casts as usual)."""

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and memory_format is None:
            return self if device is None else move_to(self, device)
        return original(self, *args, **kwargs)

    return to


class FakeWorld:
    """`world_size` ranks of a run, seen from rank 0, on `device` ('cpu' or 'cuda'; no GPU needed). Enter it
    (`with FakeWorld(8, device) as world:`) and the run's own code builds models, shards them and steps on
    fake tensors; `world.fake(t)` turns a real tensor into one of this world's, `world.batch(b)` a collated batch."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, torch.device(device)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "FakeWorld":
        if dist.is_initialized():
            raise RuntimeError("a fake world needs a process without a process group")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp._fully_shard import _fully_shard
        from torch.testing._internal.distributed.fake_pg import FakeStore

        stack = self._stack
        try:
            if self.device.type == "cuda":
                stack.enter_context(_cuda_without_gpu())
            dist.init_process_group("fake", rank=0, world_size=self.world_size, store=FakeStore())
            stack.callback(dist.destroy_process_group)
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            stack.enter_context(mock.patch.object(_fully_shard, "_init_default_mesh", lambda *a, **k: mesh))
            stack.enter_context(mock.patch.object(nn.init, "trunc_normal_", _initialise_without_reading))
            stack.enter_context(mock.patch.object(nn.Module, "to", _module_to(nn.Module.to)))
            stack.enter_context(mock.patch.object(torch, "linspace", _real_on_cpu(torch.linspace)))
            stack.enter_context(self.mode)
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def fake(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mode.from_tensor(tensor)

    @property
    def env(self):
        """Rank 0's place in this world, as `init_distributed` describes a real one."""
        from dinotrain.distributed.env import DistEnv

        return DistEnv(rank=0, world_size=self.world_size, local_rank=0, device=self.device, backend="fake")

    def batch(self, batch: dict) -> dict:
        """A collated batch of real tensors as the loop has it on this world's device (crops normalised there)."""
        from dinotrain.data.loader import to_device

        return to_device({k: self.fake(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                         self.device)
