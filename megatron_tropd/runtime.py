"""Process start-up: torch.distributed, device, seeds, and CPU mode.

This is the only module that knows whether we run on GPUs or on a CPU. Everything else in the package is
device-agnostic: it takes a device or process group as an argument, or asks ``default_device()``.

CPU mode
--------
Megatron-Core targets CUDA: its pipeline schedules, p2p communication, DDP buffers, optimizers and
inference code allocate on ``"cuda"`` / ``torch.cuda.current_device()`` and call ``torch.cuda.*`` helpers
unconditionally (no config flag avoids it). ``enable_cpu_mode()`` redirects exactly those calls so that
the unmodified Megatron-Core models, ``get_forward_backward_func`` schedules, DDP, ``get_megatron_optimizer``
(including the DistributedOptimizer), dist-checkpointing and the static inference engine run on CPU over
gloo. It is a no-op when a GPU is present, so GPU runs never see it. The pieces, each restored by
``disable_cpu_mode()``:

1. ``torch.cuda`` stubs: ``current_device() -> "cpu"``, no-op ``synchronize`` / ``set_device`` /
   ``manual_seed`` / ``manual_seed_all`` / ``set_stream``, and stream / event classes whose methods do
   nothing (CPU work is synchronous, so waiting on a stream or event is trivially satisfied).
2. A ``TorchFunctionMode`` that maps ``device="cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` and bare
   integer devices to the CPU, turns ``Tensor.cuda()`` / ``Tensor.pin_memory()`` / ``pin_memory=True`` /
   ``Tensor.record_stream`` into no-ops, and makes the no-argument ``Tensor.type()`` report
   ``torch.cuda.*`` names (the optimizers assert ``param.type() == "torch.cuda.FloatTensor"``).
3. ``GlobalMemoryBuffer.get_tensor`` allocating on CPU (used by attention for its scratch buffers).
4. A CPU RNG-states tracker installed as Megatron's "CUDA" RNG tracker, so that
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work: on a CPU the generator
   that dropout draws from is the CPU generator, so that is the one the tracker forks.

Limits: the function mode is thread-local (PyTorch keeps the mode stack per thread). It covers the thread
that called ``enable_cpu_mode()``, and CPU backward passes, which autograd runs on the calling thread.
Megatron work on other threads (e.g. ``StaticInferenceEngine.generate_async``'s executor) is not covered:
use the synchronous entry points on CPU. Pieces 1, 3 and 4 are process-wide.
Activation recomputation (``recompute_granularity``), sequence parallelism, TE/apex kernels and the dynamic
inference engine stay GPU-only.

Megatron-Core versions: written against 0.16.1; the CPU-mode tests also pass on 0.19.2 (Python 3.12,
torch 2.11, GPU hidden). The names patched here (``utils.GlobalMemoryBuffer.get_tensor``,
``tensor_parallel.random.CudaRNGStatesTracker`` / ``_CUDA_RNG_STATE_TRACKER`` / ``initialize_rng_tracker``)
are unchanged there. 0.19 also calls ``torch.cuda.current_stream()`` / ``torch.cuda.Stream`` in DDP's
grad sync, which the stubs cover.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import operator
import os
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedInfo",
    "cpu_mode_enabled",
    "cpu_mode_suspended",
    "default_device",
    "disable_cpu_mode",
    "enable_cpu_mode",
    "init_distributed",
    "set_seed",
    "shutdown_distributed",
    "start",
]


# ---------------------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank in the default process group."""
    world_size: int
    """Number of processes in the default process group."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """The device this process computes on."""
    backend: str
    """torch.distributed backend of the default group: ``nccl`` or ``gloo``."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _select_device(local_rank: int) -> torch.device:
    """Bind this process to its GPU (``LOCAL_RANK``) or return the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    num_gpus = torch.cuda.device_count()
    if local_rank >= num_gpus:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {num_gpus} GPU(s) are visible: launch at most {num_gpus} "
            "processes per node (torchrun --nproc-per-node) or fix CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> DistributedInfo:
    """Initialise torch.distributed from the torchrun environment; idempotent.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets
    them; without them it starts a single-process group (rank 0 of 1) on an in-memory store. The backend
    defaults to ``nccl`` when a GPU is visible and ``gloo`` otherwise. On GPU the CUDA device is set from
    ``LOCAL_RANK`` before the group starts, so NCCL binds the right GPU. A second call returns the existing
    group's description and changes nothing (asking it for a different backend is an error).
    """
    if dist.is_initialized():
        device = default_device()
        local_rank = _env_int("LOCAL_RANK", device.index or 0)
        if backend is not None and backend != dist.get_backend():
            raise ValueError(
                f"torch.distributed already runs {dist.get_backend()!r}, not {backend!r}: call "
                "shutdown_distributed() first to restart it with another backend"
            )
    else:
        local_rank = _env_int("LOCAL_RANK", 0)
        device = _select_device(local_rank)
        _start_process_group(backend, device, timeout_minutes)
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=str(dist.get_backend()),
    )


def _start_process_group(backend: str | None, device: torch.device, timeout_minutes: float) -> None:
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend 'nccl' needs a GPU and none is visible: use backend='gloo' on CPU")
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        # Single process without a launcher: an in-memory store needs no free port.
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun (or srun with "
            "the torchrun variables exported)"
        )
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)


def shutdown_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group; safe to call repeatedly.

    Destroying both explicitly before exit avoids the intermittent SIGABRT ("terminate called without an
    active exception") seen when a rank exits with live gloo/NCCL groups.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:  # only if megatron was imported; importing it here would cost seconds
        parallel_state.destroy_model_parallel()  # resets every megatron group global; a no-op when unset
    if dist.is_initialized():
        dist.destroy_process_group()


def default_device() -> torch.device:
    """The current CUDA device when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every CUDA device too, when present)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy only accepts 32-bit seeds
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def start(student_layout, teacher_layout=None, seed: int = 0):
    """The model-side start-up of every job, once ``torch.distributed`` runs: CPU mode where there is no
    GPU, the student's and teacher's process groups (``topology.Topology``; the teacher's layout is the
    student's when None, for jobs that run one model), and Megatron's model-parallel RNG tracker seeded
    (attention forks it even with dropout 0). Collective over every rank."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd.topology import build_topology

    enable_cpu_mode()  # a no-op on GPU machines
    topology = build_topology(student_layout, teacher_layout or student_layout)
    model_parallel_cuda_manual_seed(seed)
    return topology


# ---------------------------------------------------------------------------------------------------------
# CPU mode
# ---------------------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _cpu_if_cuda(device: Any) -> Any:
    """Map any CUDA device spelling (and bare ints, which torch reads as CUDA ordinals) to the CPU."""
    if isinstance(device, bool):  # bool is an int subclass but never a device
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _as_cuda_type_name(type_name: str) -> str:
    """``torch.FloatTensor`` -> ``torch.cuda.FloatTensor`` (what Megatron's optimizer asserts expect)."""
    if type_name.startswith("torch.cuda."):
        return type_name
    return type_name.replace("torch.", "torch.cuda.", 1)


class _CudaToCpuFunctionMode(TorchFunctionMode):
    """Intercepts every torch call on this thread and rewrites CUDA placements to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]  # already on the CPU; pinning needs a CUDA host allocator
        if func is torch.Tensor.record_stream:
            return None  # CPU tensors have no allocator streams to record
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _as_cuda_type_name(func(*args))
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_if_cuda(kwargs["device"])}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu_if_cuda(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so every wait is already met."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``; timings read 0 (use wall-clock timers on CPU)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


_TORCH_CUDA_STUBS: dict[str, Any] = {
    # A string, so torch.empty(device=...) and torch.Generator(device=...) accept it as-is.
    "current_device": lambda: "cpu",
    "set_device": _do_nothing,
    "synchronize": _do_nothing,
    # No-ops rather than CPU reseeds: torch.manual_seed itself calls cuda.manual_seed_all, and reseeding the
    # CPU generator there would make model_parallel_cuda_manual_seed silently reset the user's CPU stream.
    "manual_seed": _do_nothing,
    "manual_seed_all": _do_nothing,
    "Stream": _CpuStream,
    "Event": _CpuEvent,
    "current_stream": lambda *args, **kwargs: _CpuStream(),
    "default_stream": lambda *args, **kwargs: _CpuStream(),
    "stream": lambda *args, **kwargs: contextlib.nullcontext(),
    "set_stream": _do_nothing,
}


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """``GlobalMemoryBuffer.get_tensor`` allocating on the CPU; same reuse rule as Megatron's."""
    del mem_alloc_context  # a CUDA memory-pool context; meaningless on the CPU
    num_elements = reduce(operator.mul, tensor_shape, 1)
    buffer = self.buffer.get((name, dtype))
    if buffer is None or buffer.numel() < num_elements:
        buffer = torch.empty(num_elements, dtype=dtype, device=_CPU, requires_grad=False)
        self.buffer[(name, dtype)] = buffer
    return buffer[0:num_elements].view(*tensor_shape)


def _cpu_rng_tracker_class(base: type, default_name: str) -> type:
    """A subclass of Megatron's ``CudaRNGStatesTracker`` whose named states are CPU generator states."""

    class CpuRNGStatesTracker(base):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")  # same exception type as megatron
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            # A fresh generator: the global CPU stream is not touched.
            self.states_[name] = torch.Generator(device=_CPU).manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = default_name):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


@dataclass
class _CpuModeState:
    """What enable_cpu_mode replaced, so disable_cpu_mode can put it back."""

    function_mode: _CudaToCpuFunctionMode
    thread_id: int
    torch_cuda_originals: dict[str, Any]
    original_get_tensor: Any
    original_tracker_class: type
    original_tracker: tuple[Any, bool]


_cpu_mode: _CpuModeState | None = None
_MISSING = object()


def cpu_mode_enabled() -> bool:
    """Whether ``enable_cpu_mode()`` is in effect in this process."""
    return _cpu_mode is not None


def enable_cpu_mode() -> bool:
    """Let unmodified Megatron-Core run on the CPU (see the module docstring); idempotent.

    Call it once per process before building Megatron models (before or after ``init_distributed()``).
    Does nothing and returns False when a GPU is visible; returns True when CPU mode is (now or already)
    in effect. Importing Megatron-Core here costs a few seconds the first time.
    """
    global _cpu_mode
    if torch.cuda.is_available():
        return False
    if _cpu_mode is not None:
        return True
    from megatron.core import utils as megatron_utils
    from megatron.core.tensor_parallel import random as megatron_random

    buffer_class = megatron_utils.GlobalMemoryBuffer
    tracker_class = megatron_random.CudaRNGStatesTracker
    state = _CpuModeState(
        function_mode=_CudaToCpuFunctionMode(),
        thread_id=threading.get_ident(),
        torch_cuda_originals={name: getattr(torch.cuda, name, _MISSING) for name in _TORCH_CUDA_STUBS},
        original_get_tensor=buffer_class.get_tensor,
        original_tracker_class=tracker_class,
        original_tracker=(
            megatron_random._CUDA_RNG_STATE_TRACKER,
            megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        ),
    )
    for name, stub in _TORCH_CUDA_STUBS.items():
        setattr(torch.cuda, name, stub)
    buffer_class.get_tensor = _cpu_get_tensor
    # initialize_rng_tracker builds trackers from the module-level class, so swapping the class makes
    # every later (re)initialisation -- force_reset, inference trackers -- produce CPU trackers too.
    default_name = getattr(megatron_random, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng")
    megatron_random.CudaRNGStatesTracker = _cpu_rng_tracker_class(tracker_class, default_name)
    megatron_random.initialize_rng_tracker(force_reset=True)
    state.function_mode.__enter__()
    _cpu_mode = state
    logger.info("CPU mode enabled: Megatron-Core CUDA calls are redirected to the CPU")
    return True


@contextlib.contextmanager
def cpu_mode_suspended() -> Iterator[None]:
    """Run a block without CPU mode's interception of every torch call (about 5 us per call).

    Only for code that places nothing on a "cuda" device and calls no Megatron-Core code that does: the
    cached decoder's step loop, which issues a few hundred small torch calls per generated token.
    A no-op when CPU mode is off.
    """
    if _cpu_mode is None:
        yield
        return
    with torch._C.DisableTorchFunction():  # also disables torch function modes, ours included
        yield


def disable_cpu_mode() -> None:
    """Undo ``enable_cpu_mode()``; a no-op when it is not in effect.

    Must run on the thread that enabled CPU mode, after any torch function mode entered since has exited.
    """
    global _cpu_mode
    state = _cpu_mode
    if state is None:
        return
    if threading.get_ident() != state.thread_id:
        raise RuntimeError("disable_cpu_mode() must run on the thread that called enable_cpu_mode()")
    get_current_mode = getattr(torch.overrides, "_get_current_function_mode", None)  # private, guarded
    if get_current_mode is not None and get_current_mode() is not state.function_mode:
        raise RuntimeError("another torch function mode was entered after enable_cpu_mode(): exit it first")
    state.function_mode.__exit__(None, None, None)

    from megatron.core import utils as megatron_utils
    from megatron.core.tensor_parallel import random as megatron_random

    for name, original in state.torch_cuda_originals.items():
        if original is _MISSING:
            delattr(torch.cuda, name)
        else:
            setattr(torch.cuda, name, original)
    megatron_utils.GlobalMemoryBuffer.get_tensor = state.original_get_tensor
    megatron_random.CudaRNGStatesTracker = state.original_tracker_class
    tracker, initialized = state.original_tracker
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = initialized
    _cpu_mode = None
    logger.info("CPU mode disabled")
