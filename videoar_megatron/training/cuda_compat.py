"""Every redirect of a Megatron-core CUDA assumption to the host, in one place, each one scoped.

Megatron-core (0.16.1) creates some tensors on CUDA (``device="cuda"``, ``torch.cuda.current_device()``,
``.cuda()``) inside code whose arithmetic is device-agnostic, so on a CPU host those calls fail while
the computation around them would run. Design decision: no process-wide patch. Each redirect is a
context manager that replaces torch attributes for the duration of one ``with`` block and puts the
originals back on exit (exceptions included); code outside a block, and every CUDA run (which opens
none), sees torch unchanged. Blocks nest (each restores what it found).

The redirects, who opens them, and the Megatron calls that need them:

- :func:`host_current_device`: ``torch.cuda.current_device()`` returns ``"cpu"``. Opened by
  ``LocalEngine.forward_backward`` with sequence parallelism: the SP linears and mappings allocate
  their all-gather / reduce-scatter buffers there, in forward and backward (``tensor_parallel/layers.py``,
  ``tensor_parallel/mappings.py``, ``utils.GlobalMemoryBuffer``).
- :func:`host_allocations`: ``torch.zeros/empty/tensor(device="cuda")`` allocate on the CPU, and
  ``Tensor.type()`` names CPU tensors ``torch.cuda.*``. Opened by ``HostFP32Optimizer`` around its
  construction, grad norm and clipping: ``FP32Optimizer.__init__`` (loss-scale tensor),
  ``get_grad_norm_fp32`` with its non-CUDA fallback ``local_multi_tensor_l2_norm`` (overflow flag,
  result), ``clip_grad_by_total_norm_fp32`` (overflow flag; asserts ``grad.type() ==
  'torch.cuda.FloatTensor'``).
- :func:`host_async_checkpointing`: ``torch.cuda.current_device()`` returns ``"cpu"`` and
  ``torch.cuda.synchronize`` does nothing. Opened by ``dist_ckpt.AsyncCheckpointer`` when the run's
  device is the CPU (the local engine, and the emulated Megatron engine) around Megatron's
  asynchronous-save calls: ``TemporalAsyncCaller.schedule_async_call`` and
  ``FileSystemWriterAsync.preload_tensors`` wait for the (here nonexistent) device copies with
  ``torch.cuda.synchronize()``; ``sync_all_async_calls`` and
  ``AsyncCallsQueue.maybe_finalize_async_calls`` all-reduce their done flags and call counters in
  tensors made on ``torch.cuda.current_device()`` (gloo needs them on the host).
- :func:`emulated_cuda`: the first two above, ``Tensor.cuda()`` returns the tensor itself and
  ``torch.cuda.synchronize`` does nothing. CI only: ``tests/dist_scripts/emulated_megatron_train.py``
  opens it around the production ``videoar train`` with ``train.engine=megatron``, so the Megatron
  engine runs end to end on gloo (DDP grad buffers, schedule token counters, distributed optimizer,
  the same norm and clipping).

Limits: a redirect is an attribute of a shared module, so while a block is open it is seen by every
thread of the process. The redirects only change calls that would fail on a host without CUDA
(allocations on ``"cuda"``), except ``Tensor.type()``, whose name changes for CPU tensors inside
:func:`host_allocations` and :func:`emulated_cuda` blocks; nothing of ours reads it.
:func:`emulated_cuda` checks wiring, not kernels: it is no substitute for ``tests/test_train_gpu.py``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_MISSING = object()


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` inside the block; afterwards exactly what was there before (an attribute
    inherited from a base class is deleted again rather than copied onto ``owner``)."""
    own = vars(owner).get(name, _MISSING)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


def _on_host(factory):
    """``factory(..., device="cuda" | "cuda:i" | torch.device("cuda"))`` allocates on the CPU instead."""
    def redirected(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return redirected


def _host_current_device() -> str:
    return "cpu"


def _skip_synchronize(*args, **kwargs) -> None:
    """Nothing to wait for on the host (and the marker that :func:`emulated_cuda` is open)."""


def _no_device_copies(*args, **kwargs) -> None:
    """Nothing to wait for on the host (:func:`host_async_checkpointing`; not the emulation's marker)."""


def _cuda_type_name(tensor_type):
    """``Tensor.type()`` (no arguments) names CPU tensors as CUDA ones; with arguments it converts as usual."""
    def type_name(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return type_name


def _same_tensor(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def host_current_device() -> Iterator[None]:
    """``torch.cuda.current_device()`` returns ``"cpu"`` inside the block (sequence-parallel buffers)."""
    with _replaced(torch.cuda, "current_device", _host_current_device):
        yield


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """``torch.zeros/empty/tensor(device="cuda")`` allocate on the CPU and ``Tensor.type()`` reports CPU
    tensors as ``torch.cuda.*`` inside the block (Megatron's FP32 optimizer, grad norm and clipping)."""
    with contextlib.ExitStack() as stack:
        for name in ("zeros", "empty", "tensor"):
            stack.enter_context(_replaced(torch, name, _on_host(getattr(torch, name))))
        stack.enter_context(_replaced(torch.Tensor, "type", _cuda_type_name(torch.Tensor.type)))
        yield


@contextlib.contextmanager
def host_async_checkpointing() -> Iterator[None]:
    """``torch.cuda.current_device()`` returns ``"cpu"`` and ``torch.cuda.synchronize()`` does nothing
    inside the block (Megatron's asynchronous checkpoint calls on a host)."""
    with host_current_device(), _replaced(torch.cuda, "synchronize", _no_device_copies):
        yield


@contextlib.contextmanager
def emulated_cuda() -> Iterator[None]:
    """Megatron's CUDA engine runs on CPU tensors and gloo inside the block: every redirect of this
    module at once. For CI emulation of ``train.engine=megatron`` on a host without a GPU."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(host_current_device())
        stack.enter_context(host_allocations())
        stack.enter_context(_replaced(torch.Tensor, "cuda", _same_tensor))
        stack.enter_context(_replaced(torch.cuda, "synchronize", _skip_synchronize))
        yield


def cuda_emulated() -> bool:
    """Whether an :func:`emulated_cuda` block is open (the trainer accepts ``train.engine=megatron`` on a
    CPU device only then)."""
    return torch.cuda.synchronize is _skip_synchronize
