"""Device busy time: the share of a pass's wall time the device spent computing, from
one extra pass under torch.profiler (after the timed passes: profiling slows them)."""

from __future__ import annotations

import time
from typing import Iterator, NamedTuple

from pipelines.benchmarking.memory import sync


class Span(NamedTuple):
    """One profiler event, reduced to what the busy figure needs (times in ns)."""

    kind: str  # kineto activity type: "cpu_op", "kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", ...
    name: str
    thread: int
    start: int
    end: int


# Device-side work. Not "gpu_user_annotation": it also sits on the GPU timeline but spans
# whole record_function ranges, gaps included.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def covered_length(intervals) -> float:
    """Length of the union of (start, end) intervals: overlapping work (kernels on two
    streams, nested ops) counts once, so the result never exceeds the time spanned."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0)


def busy_intervals(spans, device: str) -> list[tuple[int, int]]:
    """The intervals during which the device computed. CUDA: kernels, memcpys and memsets.
    CPU: top-level aten operators (not inside another aten op on the same thread), i.e.
    time in tensor ops as opposed to Python, scheduler and pipeline overhead."""
    if device == "cuda":
        return [(s.start, s.end) for s in spans if s.kind in DEVICE_WORK]
    ops = sorted((s for s in spans if s.kind == "cpu_op" and s.name.startswith("aten::")),
                 key=lambda s: (s.start, -s.end))
    top, open_until = [], {}  # thread -> end of its last top-level op
    for s in ops:
        if s.end > open_until.get(s.thread, -1):  # not nested in that op
            top.append((s.start, s.end))
            open_until[s.thread] = max(s.end, open_until.get(s.thread, -1))
    return top


def profile_spans(prof) -> Iterator[Span]:
    """The raw kineto events of a finished torch.profiler run. Not prof.events(): building
    its FunctionEvent tree takes about a minute per million events, a mixed sweep has
    millions; the raw list takes seconds."""
    return (Span(e.activity_type(), e.name(), e.start_thread_id(), e.start_ns(), e.end_ns())
            for e in prof.profiler.kineto_results.events())


def device_busy(run, device: str) -> tuple[float, float]:
    """Run `run()` once under torch.profiler; return (busy fraction, wall seconds of that
    pass). Busy = covered length of busy_intervals / wall time. On CUDA only device activity
    is recorded: recording every CPU op would slow the host and starve the GPU it measures.
    Clipped to 1 against profiler/perf_counter clock skew of microseconds."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    sync(device)
    with profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - t0
    busy = covered_length(busy_intervals(profile_spans(prof), device)) / 1e9
    return min(1.0, busy / wall), wall


def busy_fields(busy: tuple[float, float] | None) -> dict:
    """device_busy and the profiled pass's seconds (profiler overhead included) for a record."""
    return {} if busy is None else dict(device_busy=busy[0], profiled_s=busy[1])
