"""Peak memory of a timed path, and the clean-up between paths that makes it the path's own."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from pathlib import Path


def sync(device: str) -> None:
    """Wait for queued device work, so a clock read afterwards covers it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Between paths, so each path's peak memory is its own. On CPU that is the resident
    set, which keeps freed heap (a profiled pass's events: about 2 KB each, millions of
    them) unless glibc is told to give it back."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory while a block runs. GPU, in-process: torch's max allocated bytes;
    GPU, other processes (the Ray job): device-wide used memory, sampled, above the start;
    CPU, in-process: this process's resident set, sampled. None where unknown."""

    def __init__(self, device: str, in_process: bool = True):
        self.device, self.in_process, self.peak = device, in_process, None
        self._stop = threading.Event()

    def _used(self) -> int | None:
        import torch

        if self.device == "cuda" and not self.in_process:
            free_bytes, total = torch.cuda.mem_get_info()
            return total - free_bytes
        if self.device == "cpu" and self.in_process:
            try:
                return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError):
                return None
        return None

    def _sample(self):
        while not self._stop.wait(0.05):
            used = self._used()
            if used is not None:
                self.peak = max(self.peak or 0, used)

    def __enter__(self):
        import torch

        if self.device == "cuda" and self.in_process:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self._used()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda" and self.in_process:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            if self.peak is not None and not self.in_process and self.base is not None:
                self.peak -= self.base  # what the job added on the device
        return False
