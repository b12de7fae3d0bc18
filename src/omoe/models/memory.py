"""Memory of a step, measured without a GPU counter: what autograd saves, and the CPU peak."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while ``step`` runs its forward (unique
    storages, counted with ``saved_tensors_hooks``); then backpropagates ``step``'s loss."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors alive at once while ``fn`` runs, over those it allocates (CPU). CPU has
    no ``max_memory_allocated``; the profiler records each op's own allocations and frees
    (``self_cpu_memory_usage``), and their running sum in time order peaks where ``fn`` holds the
    most. Op granularity: a peak inside one op that it frees before returning is not seen."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
