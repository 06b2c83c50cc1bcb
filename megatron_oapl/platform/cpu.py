"""Run unmodified Megatron-Core on CPU over gloo.

Megatron-Core assumes CUDA: it allocates with `device=torch.cuda.current_device()`, moves modules with
`.cuda()`, asserts on `tensor.type()` being a `torch.cuda.*Tensor` string, and keeps its tensor-parallel
RNG streams in CUDA generators. Rather than forking Megatron, this module redirects those calls to the
CPU, so the code under test is the code that runs on GPUs. It is installed only when no GPU exists (see
`megatron_oapl.platform.activate`) and is never used on a CUDA machine.

What is patched, and why:
- `CudaOnCpu` (a TorchFunctionMode): rewrites any `device=` naming CUDA (str, torch.device or an int
  ordinal) to CPU, makes `Tensor.cuda()` the identity, and makes argument-less `Tensor.type()` report
  `torch.cuda.<X>Tensor` (the optimizer and grad clipping assert on that string).
- `torch.cuda.{current_device, synchronize, device_count, set_device, ...}`: answers for "one device 0".
- RNG: `torch.cuda.{get,set}_rng_state/manual_seed` and Megatron's `_get/_set_cuda_rng_state` act on
  the CPU default generator, so `model_parallel_cuda_manual_seed` and the RNG tracker work unchanged.
- `torch.cuda.nvtx` ranges and streams/events: no-ops (profiling and overlap only).
- Autograd's engine (`Variable._execution_engine`): every backward runs with `CudaOnCpu` pushed. A
  TorchFunctionMode is popped while its own handler runs, and `Tensor.backward`, `torch.autograd.backward`
  and `torch.autograd.grad` are overridable functions that reach the engine through that handler: the
  engine would capture an empty mode stack, and `autograd.Function.backward` code (Megatron's
  `_gather_along_first_dim` under sequence parallelism, activation recompute) would allocate on CUDA.
- MoE (upstream assumptions of a GPU with TE and NCCL): the router's gating tests a `te_general_gemm` name
  that exists only with Transformer Engine; the alltoall dispatcher hands gloo tensor split sizes (it turns
  only CUDA tensors into host sizes); with TP > 1 it gathers and reduce-scatters parts of different sizes per
  rank, which NCCL supports and gloo does not (padded / all-reduced here).
"""

from __future__ import annotations

import contextlib

import torch
from torch._C import _pop_torch_function_stack, _push_on_torch_function_stack
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

_INSTALLED = False
_MODE: "CudaOnCpu | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions (and in Megatron's
    # `device=torch.cuda.current_device()`); bool is an int subclass but never a device.
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device):
    return _CPU if _is_cuda_device(device) else device


class CudaOnCpu(TorchFunctionMode):
    """Redirects CUDA device requests made through torch functions to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_device_like(args[1]):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _is_device_like(x) -> bool:
    return isinstance(x, (torch.device, str)) or (isinstance(x, int) and not isinstance(x, bool))


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


@contextlib.contextmanager
def _mode_pushed(mode: TorchFunctionMode):
    """`mode` on the torch-function stack for the block (pushed only where it is missing)."""
    if any(m is mode for m in _get_current_function_mode_stack()):
        yield
        return
    _push_on_torch_function_stack(mode)
    try:
        yield
    finally:
        _pop_torch_function_stack()


class _EngineUnderMode:
    """Autograd's engine, running each backward pass with the CPU layer's mode active: the engine hands
    the caller's mode stack to every backward node, hook and recomputation it runs."""

    def __init__(self, engine, mode: TorchFunctionMode):
        self._engine = engine
        self._mode = mode

    def run_backward(self, *args, **kwargs):
        with _mode_pushed(self._mode):
            return self._engine.run_backward(*args, **kwargs)

    def __getattr__(self, name):  # queue_callback, is_checkpoint_valid, ...
        return getattr(self._engine, name)


def _patch_autograd_engine(mode: TorchFunctionMode) -> None:
    from torch.autograd.variable import Variable

    if not isinstance(Variable._execution_engine, _EngineUnderMode):
        Variable._execution_engine = _EngineUnderMode(Variable._execution_engine, mode)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


def _cpu_move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron's `maybe_move_tensor_to_cpu` converts only CUDA tensors, so on CPU the alltoall split sizes
    stay tensors, which gloo's all_to_all_single refuses; it needs plain sizes as on a GPU machine."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _gather_uneven_on_gloo(original):
    """Megatron's first-dim gather with per-rank sizes hands all_gather outputs of different sizes, which
    NCCL accepts and gloo refuses: pad every rank's part to the longest, gather, cut each back."""
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or len(set(output_split_sizes)) == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros(max(output_split_sizes), *input_.shape[1:])
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])
    return gather


def _reduce_scatter_uneven_on_gloo(original):
    """The reverse (its backward): with per-rank sizes gloo has no reduce_scatter; sum everything, keep ours."""
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]]
    return reduce_scatter


def _patch_megatron_moe() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_oapl.platform.upstream import guard_missing_te_names

    guard_missing_te_names()
    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_move_to_host
    # With TP > 1 the dispatcher gathers each TP rank's routed tokens, a different number per rank.
    mappings._gather_along_first_dim = _gather_uneven_on_gloo(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_uneven_on_gloo(mappings._reduce_scatter_along_first_dim)


def install() -> None:
    """Install the CPU layer in this process (idempotent)."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU compatibility layer must not be installed on a CUDA machine")
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _MODE = CudaOnCpu()
    _patch_autograd_engine(_MODE)
    _MODE.__enter__()
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
