"""Peak tensor memory of a call on the CPU, from the profiler's allocation events.

Used where a memory bound must be measured rather than assumed: ``bench/full_kl.py`` reports the
full-vocabulary path's extra memory with it, and ``tests/test_full_vocab.py`` checks that path keeps no
``[T, V]`` teacher tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_cpu_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak live CPU tensor memory allocated while ``fn`` runs, above the level at its start: the running
    sum of the profiler's allocation (+bytes) and free (-bytes) events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
