"""Wall time, CPU time and peak memory of a block of work (each training run of a comparison or benchmark)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path


class ResourceMeter:
    """Wall time, CPU time and peak resident memory (RSS) of a block of work in this process.

    The peak is the kernel's high-water mark (`VmHWM`), reset at the start of the block on Linux
    (`/proc/self/clear_refs`), so it is the block's own peak, torch tensors included; where that reset is
    impossible it is `getrusage`'s process-lifetime maximum (`block_peak` False). tracemalloc is not used:
    it misses torch's allocations and slowed training by about 20% on 2 CPU cores.
    """

    def __enter__(self) -> ResourceMeter:
        self.block_peak = _reset_rss_peak()
        self.started, self.cpu_started = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = _cpu_seconds() - self.cpu_started
        self.peak_rss_mb = _rss_peak_mb()


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: unlike wall time, not inflated by other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024

__all__ = ["ResourceMeter"]
