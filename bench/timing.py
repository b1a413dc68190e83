"""Timing one call: wall clock on the CPU, CUDA events on a GPU; warm-up, then a time-budgeted median."""

import gc
import statistics
import time
from dataclasses import dataclass

import torch

# Written before every timed call on a GPU, so that no contender finds the parameters in the
# L2 cache (50 MB on an H100) left there by the previous call: in training they would not be.
CUDA_CACHE_FLUSH_BYTES = 256 * 2**20


class DeviceClock:
    """Times a zero-argument call on ``device`` in milliseconds."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            self._flush_buffer = torch.empty(CUDA_CACHE_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def synchronize(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn):
        """Device time of one call (on a CPU: wall time). ``last_host_ms``: the host's own time
        in the call (on a GPU: launching, without waiting for the kernels)."""
        if not self.is_cuda:
            start = time.perf_counter()
            fn()
            self.last_host_ms = (time.perf_counter() - start) * 1e3
            return self.last_host_ms
        self._flush_buffer.zero_()
        torch.cuda.synchronize(self.device)
        self._start.record()
        host_start = time.perf_counter()
        fn()
        self.last_host_ms = (time.perf_counter() - host_start) * 1e3
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end)


@dataclass(frozen=True)
class Budget:
    """How long to measure one contender in one mode."""

    warmup_calls: int  # at least this many warm-up calls ...
    warmup_s: float  # ... and at least this long warming up
    min_repeats: int  # at least this many timed calls ...
    min_s: float  # ... and at least this long timing
    max_repeats: int  # never more timed calls than this
    max_s: float  # the slowest contenders: stop after this long ...
    slow_min_repeats: int  # ... once this many calls are timed


FULL_BUDGET = Budget(warmup_calls=2, warmup_s=0.1, min_repeats=5, min_s=0.5, max_repeats=2000, max_s=10.0,
                     slow_min_repeats=3)
QUICK_BUDGET = Budget(warmup_calls=1, warmup_s=0.0, min_repeats=3, min_s=0.05, max_repeats=200, max_s=0.3,
                      slow_min_repeats=1)


@dataclass
class Timing:
    times_ms: list  # every timed call, in order
    warmup_calls: int
    host_ms: list = None  # the host's time in each timed call (see DeviceClock.time_ms)

    @property
    def median_ms(self):
        return statistics.median(self.times_ms)

    @property
    def median_host_ms(self):
        return statistics.median(self.host_ms) if self.host_ms else None


def measure(fn, clock, budget, prior_calls=0):
    """Warm up ``fn``, then time calls until ``budget`` is met, with Python's garbage collector paused.

    ``prior_calls``: calls of ``fn`` already made (correctness checks); they count as warm-up calls.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        warmup_calls, warmup_ms = prior_calls, 0.0
        while warmup_calls < budget.warmup_calls or warmup_ms < budget.warmup_s * 1e3:
            warmup_ms += clock.time_ms(fn)
            warmup_calls += 1
        times_ms, host_ms = [], []
        total_ms = 0.0
        while len(times_ms) < budget.max_repeats:
            enough = len(times_ms) >= budget.min_repeats and total_ms >= budget.min_s * 1e3
            too_long = len(times_ms) >= budget.slow_min_repeats and total_ms >= budget.max_s * 1e3
            if enough or too_long:
                break
            times_ms.append(clock.time_ms(fn))
            host_ms.append(clock.last_host_ms)
            total_ms += times_ms[-1]
    finally:
        if was_enabled:
            gc.enable()
    return Timing(times_ms, warmup_calls, host_ms)
